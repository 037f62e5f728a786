"""Coded concepts the triage SR writes: the versioned model label -> code table and the fixed codes.

Every term the SR (:mod:`pacs_bridge.sr`) puts in a CODE item or a concept name comes from here, so that the
vocabulary is reviewed in one place (dicom-results.md §3).

Order of preference for a diagnosis: a SNOMED CT concept where one names the model's label (confirm the FSN
and active status in a SNOMED browser before a clinical release), else a code of the private scheme
``99PRIMA``, whose Code Values are short ids (Code Value is SH, 16 characters at most) and whose Code Meaning
is the model's own label. The scheme is declared in the SR header's Coding Scheme Identification Sequence
(0008,0110) by :func:`coding_scheme_identification`, with :data:`CODE_TABLE_VERSION` as its Coding Scheme
Version.

Rules for changing the table, so that SRs already in a PACS still read back:

* never reuse a code value for a different label; retire it instead;
* a new label, a new code or a new referral service raises :data:`CODE_TABLE_VERSION`;
* a label moved from ``99PRIMA`` to SNOMED CT keeps its private code in :data:`RETIRED_DIAGNOSIS_CODES`, so
  that :func:`label_for_code` still resolves SRs written with the old table.
"""
from __future__ import annotations

from collections.abc import Mapping

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.coding import Code

#: Version of the label -> code table; written as the Coding Scheme Version of 99PRIMA.
CODE_TABLE_VERSION = "2026.3"  # 2026.2: chest/CT findings of slice_knn; 2026.3: presence, not analysed

#: Designator of our private coding scheme (private designators start with "99", PS3.16 §8.1).
PRIVATE_SCHEME = "99PRIMA"
PRIVATE_SCHEME_NAME = "Triage worker model labels and result concepts"
PRIVATE_SCHEME_RESPONSIBLE_ORGANIZATION = "Triage Worker Project"

#: One row per model label: (coding scheme designator, code value, code meaning).
_Row = tuple[str, str, str]

#: Prima's 52 diagnosis labels (prima.md §5, in class-index order) -> code. Meanings of SNOMED CT rows follow
#: dicom-results.md §3; private rows carry the label itself as meaning.
DIAGNOSIS_CODES: Mapping[str, _Row] = {
    "cyst_arachnoid_cyst": ("SCT", "33595009", "Arachnoid cyst"),
    "cyst_colloid_cyst": (PRIVATE_SCHEME, "CYST-COLLOID", "cyst_colloid_cyst"),
    "developmental_dandy_walker_malformation": (
        PRIVATE_SCHEME, "DEV-DANDYWALKER", "developmental_dandy_walker_malformation"),
    "developmental_dysgenesis_corpus_callosum": (
        PRIVATE_SCHEME, "DEV-CC-DYSGEN", "developmental_dysgenesis_corpus_callosum"),
    "developmental_heterotopia": (PRIVATE_SCHEME, "DEV-HETEROTOPIA", "developmental_heterotopia"),
    "infectious_brain_abscess": ("SCT", "441806004", "Abscess of brain"),
    # Broader than the label (viral); chosen over a private code per the order of preference.
    "infectious_viral_encephalitis": ("SCT", "45170000", "Encephalitis"),
    "inflammatory_multiple_sclerosis": ("SCT", "24700007", "Multiple sclerosis"),
    "inflammatory_neurosarcoid": (PRIVATE_SCHEME, "INFL-NEUROSARC", "inflammatory_neurosarcoid"),
    "sellar_craniopharyngioma": (PRIVATE_SCHEME, "SELL-CRANIOPH", "sellar_craniopharyngioma"),
    "sellar_pituitary_adenoma": ("SCT", "254956000", "Pituitary adenoma"),
    "sellar_rathkes_cleft_cyst": ("SCT", "52859009", "Rathke cleft cyst"),
    "spine_syrinx": (PRIVATE_SCHEME, "SPINE-SYRINX", "spine_syrinx"),
    "structural_brain_herniation": (PRIVATE_SCHEME, "STRUCT-HERNIA", "structural_brain_herniation"),
    "structural_cephaloceles": (PRIVATE_SCHEME, "STRUCT-CEPHALOC", "structural_cephaloceles"),
    "structural_cerebral_atrophy": ("SCT", "278849000", "Cerebral atrophy"),
    "structural_chiari_malformation": ("SCT", "253184003", "Chiari malformation"),
    "structural_edema": ("SCT", "2032001", "Cerebral edema"),
    "structural_encephalomalacia": ("SCT", "58762006", "Encephalomalacia"),
    "structural_mass_effect": ("SCT", "46963008", "Compression of brain"),
    "structural_midline_shift": (PRIVATE_SCHEME, "STRUCT-MLS", "structural_midline_shift"),
    "surgical_catheter": (PRIVATE_SCHEME, "SURG-CATHETER", "surgical_catheter"),
    "surgical_craniotomy": (PRIVATE_SCHEME, "SURG-CRANIOTOMY", "surgical_craniotomy"),
    "surgical_resection_cavity": (PRIVATE_SCHEME, "SURG-RESECTION", "surgical_resection_cavity"),
    "trauma_brain_contusion": (PRIVATE_SCHEME, "TRAUMA-CONTUSION", "trauma_brain_contusion"),
    "trauma_diffuse_axonal_injury": (PRIVATE_SCHEME, "TRAUMA-DAI", "trauma_diffuse_axonal_injury"),
    "trauma_subdural_hematoma": ("SCT", "35486000", "Subdural intracranial hemorrhage"),
    "tumor_adult_brain_metastasis": ("SCT", "94225005", "Metastatic malignant neoplasm to brain"),
    "tumor_adult_glioma": ("SCT", "393564001", "Glioma"),
    # Glioblastoma (SCT 1163375002) is narrower than "high grade glioma": keep the model's own concept.
    "tumor_adult_high_grade_glioma": (PRIVATE_SCHEME, "TUMOR-HGG", "tumor_adult_high_grade_glioma"),
    "tumor_adult_low_grade_glioma": (PRIVATE_SCHEME, "TUMOR-LGG", "tumor_adult_low_grade_glioma"),
    "tumor_adult_lymphoma": (PRIVATE_SCHEME, "TUMOR-LYMPHOMA", "tumor_adult_lymphoma"),
    "tumor_adult_meningioma": ("SCT", "302820008", "Intracranial meningioma"),
    "tumor_adult_pineal_tumor": (PRIVATE_SCHEME, "TUMOR-PINEAL", "tumor_adult_pineal_tumor"),
    "tumor_adult_schwannoma": ("SCT", "985004", "Schwannoma"),
    "tumor_pediatric_brainstem_glioma": (
        PRIVATE_SCHEME, "PEDS-BS-GLIOMA", "tumor_pediatric_brainstem_glioma"),
    "tumor_pediatric_ependymoma": (PRIVATE_SCHEME, "PEDS-EPENDYMOMA", "tumor_pediatric_ependymoma"),
    "tumor_pediatric_germ_cell_tumor": (PRIVATE_SCHEME, "PEDS-GERMCELL", "tumor_pediatric_germ_cell_tumor"),
    "tumor_pediatric_medulloblastoma": ("SCT", "443333004", "Medulloblastoma"),
    "tumor_pediatric_pilocytic_astrocytoma": (
        PRIVATE_SCHEME, "PEDS-PILOCYTIC", "tumor_pediatric_pilocytic_astrocytoma"),
    "vascular_hemorrhagic_intracranial_hemorrhage": ("SCT", "1386000", "Intracranial hemorrhage"),
    "vascular_hemorrhagic_intraventricular_hemorrhage": (
        PRIVATE_SCHEME, "HEM-IVH", "vascular_hemorrhagic_intraventricular_hemorrhage"),
    # The label's misspelling ("hemorrahage") is Prima's own and is kept as the key.
    "vascular_hemorrhagic_subarachnoid_hemorrahage": ("SCT", "21454007", "Subarachnoid hemorrhage"),
    "vascular_ischemic_lacunar_stroke": ("SCT", "81037000", "Lacunar infarct"),
    "vascular_ischemic_large_vessel_stroke": ("SCT", "422504002", "Ischemic stroke"),
    "vascular_ischemic_moyamoya": (PRIVATE_SCHEME, "ISCH-MOYAMOYA", "vascular_ischemic_moyamoya"),
    "vascular_ischemic_small_vessel_disease": (
        PRIVATE_SCHEME, "ISCH-SVD", "vascular_ischemic_small_vessel_disease"),
    "vascular_malformation_arteriovenous_malformation": (
        PRIVATE_SCHEME, "VM-AVM", "vascular_malformation_arteriovenous_malformation"),
    "vascular_malformation_cavernoma": ("SCT", "416824008", "Cavernous hemangioma"),
    "vascular_malformation_cerebral_aneurysm": ("SCT", "128609009", "Intracranial aneurysm"),
    "ventricular_intracranial_hypotension": (
        PRIVATE_SCHEME, "VENT-IC-HYPOT", "ventricular_intracranial_hypotension"),
    "ventricular_ventriculomegaly": ("SCT", "413808003", "Ventriculomegaly"),
}

#: Chest radiograph and CT findings that the slice_knn pipeline scores (kNN and zero-shot from text prompts,
#: models/prompts/slice_findings.json). Each SNOMED CT code is the one DICOM PS3.16 uses for the concept, as the
#: concept dictionary generated from PS3.16 that pydicom 3.0.2 ships lists it (pydicom/sr/_concepts_dict.py;
#: the context groups named in each comment); findings without a PS3.16 SNOMED code are 99PRIMA rows.
CHEST_CT_FINDING_CODES: Mapping[str, _Row] = {
    "chest_pneumothorax": ("SCT", "36118008", "Pneumothorax"),  # CID 6102, 6105
    "chest_pleural_effusion": ("SCT", "60046008", "Pleural effusion"),  # CID 645, 8134
    "chest_cardiomegaly": ("SCT", "287272002", "Cardiomegaly"),  # CID 12248, 12249
    "chest_pulmonary_edema": ("SCT", "19242006", "Pulmonary edema"),  # CID 3700
    "chest_nodule": ("SCT", "27925004", "Nodule"),  # CID 6102, 6104
    "chest_mass": ("SCT", "4147007", "Mass"),  # CID 6102, 6104
    "chest_pulmonary_embolism": ("SCT", "59282003", "Pulmonary embolism"),  # CID 6102, 6104
    "chest_aortic_dissection": ("SCT", "308546005", "Aortic dissection"),  # CID 3700
    "chest_consolidation": (PRIVATE_SCHEME, "CHEST-CONSOLID", "chest_consolidation"),
    "chest_atelectasis": (PRIVATE_SCHEME, "CHEST-ATELECT", "chest_atelectasis"),
}

#: Every finding label the SR can code: Prima's diagnoses and the chest/CT findings.
FINDING_CODES: Mapping[str, _Row] = {**DIAGNOSIS_CODES, **CHEST_CT_FINDING_CODES}

#: Codes that an earlier table version gave a label; read-only (never written), so old SRs still read back.
RETIRED_DIAGNOSIS_CODES: Mapping[tuple[str, str], str] = {}

#: Referral service name (as the model bundles name it) -> CID 7030 "Institutional Department/Unit/Service".
#: Neurology sub-specialties are not in CID 7030: add them as 99PRIMA rows.
REFERRAL_CODES: Mapping[str, _Row] = {
    "neurosurgery": ("SCT", "310159002", "Neurosurgery"),
    "neurology": ("SCT", "309937004", "Neurology"),
    "stroke": ("SCT", "309966001", "Stroke"),
    "oncology": ("SCT", "309902002", "Clinical Oncology"),
    "radiotherapy": ("SCT", "309903007", "Radiotherapy"),
    "pediatric_oncology": ("SCT", "309948006", "Pediatric Oncology"),
    "interventional_radiology": ("SCT", "708174004", "Interventional Radiology Service"),
    "otorhinolaryngology": ("SCT", "309978002", "Otorhinolaryngology"),
    "ophthalmology": ("SCT", "309935007", "Ophthalmology"),
    "endocrinology": ("SCT", "309925001", "Endocrinology"),
    "infectious_disease": ("SCT", "309934006", "Infectious Disease"),
    "psychiatry": ("SCT", "309958005", "Psychiatry"),
    "emergency": ("SCT", "225728007", "Accident and Emergency"),
    "intensive_care": ("SCT", "309904001", "Intensive Care"),
    "neuroradiology": ("UMLS", "C2183225", "Neuroradiology"),
}

#: Worklist priority (:data:`pacs_bridge.results.PRIORITIES`) -> SCT value of the concept "Priority".
#: (SCT 373115008 is a different "Routine"; do not use it.)
PRIORITY_CODES: Mapping[str, _Row] = {
    "routine": ("SCT", "50811001", "Routine"),
    "urgent": ("SCT", "103391001", "Urgent"),
    "stat": ("SCT", "49499008", "Stat"),
}

# Concept names and fixed values of the SR (dicom-results.md §2).
#: TID 1500 "Procedure reported" by the evidence's Modality: CID 100 members ("MR Brain" is not one; it goes
#: in the header's Performed Procedure Code Sequence instead).
PROCEDURE_MRI = Code("25056-3", "LN", "MRI unspecified body region")
PROCEDURES_REPORTED: Mapping[str, Code] = {
    "MR": PROCEDURE_MRI,
    "CT": Code("25045-6", "LN", "CT unspecified body region"),
}
#: "Procedure reported" for evidence of any other modality.
PROCEDURE_IMAGING = Code("363679005", "SCT", "Imaging procedure")
#: Performed Procedure Code Sequence (0040,A372) entry for a brain MR study.
PERFORMED_PROCEDURE_MR_BRAIN = Code("24590-2", "LN", "MR Brain")
PERFORMED_PROCEDURE_CT_HEAD = Code("24725-4", "LN", "CT Head")
#: BodyPartExamined values (upper case, as PS3.16 Annex L defines them and scanners write them) of the head.
HEAD_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "CEREBRUM", "HEADNECK"})
#: (modality, region) -> the LOINC code of the procedure, where the region is known: the header's Performed
#: Procedure Code Sequence when the images carry no Procedure Code Sequence of their own. TID 1500 "Procedure
#: reported" stays the modality's CID 100 code (PixelMed refuses codes outside CID 100 there, and CID 100 has no
#: head codes); the region goes to each finding as its Finding Site (FINDING_SITES).
PROCEDURES_BY_REGION: Mapping[tuple[str, str], Code] = {
    ("MR", "HEAD"): PERFORMED_PROCEDURE_MR_BRAIN,
    ("CT", "HEAD"): PERFORMED_PROCEDURE_CT_HEAD,
}
#: Body region -> TID 1501 "Finding Site" (CID 7151 style anatomic codes) of every finding of such a study.
FINDING_SITES: Mapping[str, Code] = {"HEAD": Code("12738006", "SCT", "Brain")}
#: TID 1500 row 12 container of study-level evaluations.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
PRIORITY = Code("260870009", "SCT", "Priority")
PATIENT_REFERRAL = Code("3457005", "SCT", "Patient referral")
PROBABILITY = Code("122157", "DCM", "Probability")
#: The unit of probabilities and attribution weights: UCUM "1", values 0-1 (not "%").
UNIT_ONE = Code("1", "UCUM", "no units")

# Private concepts of the result that no standard term names.
#: NUM under a finding: the explanation's weight of one image region (LIME ridge coefficient).
ATTRIBUTION_WEIGHT = Code("ATTRIB-WEIGHT", PRIVATE_SCHEME, "Attribution weight")
#: TEXT in the study-level evaluations: one model priority class score, "<class>=<score>".
PRIORITY_SCORE = Code("PRIORITY-SCORE", PRIVATE_SCHEME, "Priority score")
#: TEXT in the study-level evaluations: one similar prior study found by the slice-embedding index.
SIMILAR_STUDY = Code("SIMILAR-STUDY", PRIVATE_SCHEME, "Similar prior study")
#: Finding of the single measurement group written when the model reported no diagnosis at all.
NO_DIAGNOSIS_REPORTED = Code("NO-DX-REPORTED", PRIVATE_SCHEME, "No diagnosis reported by the model")
#: NUM under a finding: the operating threshold the probability is compared with (UCUM "1", 0-1). No standard
#: concept names a classifier's decision threshold.
OPERATING_THRESHOLD = Code("OPERATING-POINT", PRIVATE_SCHEME, "Operating point threshold")
#: CODE under a finding (TID 1501 qualitative evaluation): whether the model calls the finding. SNOMED CT
#: "Presence" with the values below (confirm FSN and status in a SNOMED browser before a clinical release):
#: Present = at or above the operating threshold (called); Absent = below it for a label the site has the model
#: rule out (``model.report_absent``); Undetermined = below it, listed only as part of the differential.
PRESENCE = Code("705057003", "SCT", "Presence")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
UNDETERMINED = Code("373068000", "SCT", "Undetermined")
#: Finding of a measurement group that stands for one similar prior study (its tracking identifier is a
#: pseudonymous reference, never the other study's UID), with its similarity and its confirmed findings.
SIMILAR_PRIOR_STUDY = Code("SIMILAR-PRIOR", PRIVATE_SCHEME, "Similar prior study")
SIMILARITY = Code("SIMILARITY", PRIVATE_SCHEME, "Similarity to this study")
CONFIRMED_FINDING = Code("CONFIRMED-DX", PRIVATE_SCHEME, "Finding confirmed by its final report")
#: A study the input adequacy gate turned away: the finding of its one measurement group, the study-level
#: outcome, and a reason (TEXT) per check that failed.
NOT_ANALYSED = Code("NOT-ANALYSED", PRIVATE_SCHEME, "Not analysed: input inadequate for the model")
AI_OUTCOME = Code("AI-OUTCOME", PRIVATE_SCHEME, "AI analysis outcome")
NOT_ANALYSED_REASON = Code("NOT-ANALYSED-WHY", PRIVATE_SCHEME, "Reason not analysed")


def body_region(body_part: str) -> str:
    """The region a BodyPartExamined value names, for procedure codes and index partitions ("" if none)."""
    text = "".join(ch for ch in body_part.upper() if ch.isalnum())
    return "HEAD" if text in HEAD_BODY_PARTS else text


def procedure_reported(modality: str) -> Code:
    """TID 1500 "Procedure reported" (CID 100) for a modality."""
    return PROCEDURES_REPORTED.get(modality, PROCEDURE_IMAGING)


def performed_procedure(modality: str, body_part: str) -> Code | None:
    """The region-specific procedure a study's modality and body part say was done (MR Brain, CT Head), if known."""
    return PROCEDURES_BY_REGION.get((modality, body_region(body_part)))


def finding_site(body_part: str) -> Code | None:
    """TID 1501 Finding Site of the findings of a study of this body part, if the product knows it."""
    return FINDING_SITES.get(body_region(body_part))


def _concept(row: _Row) -> CodedConcept:
    scheme, value, meaning = row
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _key(code: Code | CodedConcept) -> tuple[str, str]:
    return (code.scheme_designator, code.value)


def _reverse(table: Mapping[str, _Row], what: str) -> dict[tuple[str, str], str]:
    reverse: dict[tuple[str, str], str] = {}
    for name, (scheme, value, _meaning) in table.items():
        if (scheme, value) in reverse:
            raise ValueError(
                f"{what} table gives {scheme} {value} to both {reverse[(scheme, value)]!r} and {name!r}")
        reverse[(scheme, value)] = name
    return reverse


_LABEL_BY_CODE = {**RETIRED_DIAGNOSIS_CODES, **_reverse(FINDING_CODES, "diagnosis")}
_REFERRAL_BY_CODE = _reverse(REFERRAL_CODES, "referral")
_PRIORITY_BY_CODE = _reverse(PRIORITY_CODES, "priority")

#: The model labels the table knows, in Prima's class-index order.
LABELS: tuple[str, ...] = tuple(DIAGNOSIS_CODES)


def code_for_label(label: str) -> CodedConcept:
    """The code of a model diagnosis label (the TID 1501 "Finding" value)."""
    try:
        return _concept(FINDING_CODES[label])
    except KeyError:
        raise ValueError(
            f"diagnosis label {label!r} is not in the code table (version {CODE_TABLE_VERSION}); "
            "add it to pacs_bridge.codes.DIAGNOSIS_CODES"
        ) from None


def label_for_code(code: Code | CodedConcept) -> str:
    """The model label a diagnosis code stands for, also for codes of earlier table versions."""
    try:
        return _LABEL_BY_CODE[_key(code)]
    except KeyError:
        raise ValueError(
            f"code ({code.value}, {code.scheme_designator}, {code.meaning!r}) is not a diagnosis of the code "
            f"table (version {CODE_TABLE_VERSION})"
        ) from None


def code_for_referral(service: str) -> CodedConcept:
    """The CID 7030 service code of a referral name (the value of "Patient referral")."""
    try:
        return _concept(REFERRAL_CODES[service])
    except KeyError:
        raise ValueError(
            f"referral service {service!r} is not in the code table (known: {', '.join(REFERRAL_CODES)}); "
            "add it to pacs_bridge.codes.REFERRAL_CODES"
        ) from None


def referral_for_code(code: Code | CodedConcept) -> str:
    """The referral name a service code stands for."""
    try:
        return _REFERRAL_BY_CODE[_key(code)]
    except KeyError:
        raise ValueError(
            f"code ({code.value}, {code.scheme_designator}, {code.meaning!r}) is not a referral service of "
            f"the code table (version {CODE_TABLE_VERSION})"
        ) from None


def code_for_priority(priority: str) -> CodedConcept:
    """The SCT value of "Priority" for a worklist priority ("routine", "urgent", "stat")."""
    try:
        return _concept(PRIORITY_CODES[priority])
    except KeyError:
        raise ValueError(f"priority {priority!r} is not one of {tuple(PRIORITY_CODES)}") from None


def priority_for_code(code: Code | CodedConcept) -> str:
    """The worklist priority an SCT priority value stands for."""
    try:
        return _PRIORITY_BY_CODE[_key(code)]
    except KeyError:
        raise ValueError(
            f"code ({code.value}, {code.scheme_designator}, {code.meaning!r}) is not a priority of the code "
            f"table (one of {tuple(PRIORITY_CODES)})"
        ) from None


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence (0008,0110) item that declares 99PRIMA (PS3.3 C.12.1)."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        version=CODE_TABLE_VERSION,
        responsible_organization=PRIVATE_SCHEME_RESPONSIBLE_ORGANIZATION,
    )
