"""Triage result <-> DICOM Comprehensive 3D SR (TID 1500 "Imaging Measurement Report").

:func:`build_sr` encodes a :class:`~pacs_bridge.results.TriageResult` in the layout of dicom-results.md §2,
which validates without errors or warnings in PixelMed's DicomSRValidator and without errors in dciodvfy and
dsrdump; :func:`read_sr` decodes it back to an equal result; :func:`is_our_sr` recognises our own SRs, so that
they never trigger processing.

Content tree (PS3.16 template and row in brackets)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")                       [TID 1500]
      HAS CONCEPT MOD  CODE Language of Content Item and Descendants = en-US    [TID 1204]
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID, Name,       [TID 1002, 1004]
                       Manufacturer, Model Name
      HAS CONCEPT MOD  CODE Procedure reported = the CID 100 code of each       [TID 1500 row 4]
                       evidence modality (MRI / CT unspecified body region); the region-specific
                       procedure (the images' Procedure Code Sequence, else LN 24590-2 "MR Brain",
                       LN 24725-4 "CT Head") is the header's Performed Procedure Code Sequence
      CONTAINS CONTAINER Imaging Measurements                                   [TID 1500 row 6]
        CONTAINS CONTAINER Measurement Group, one per finding                   [TID 1501]
          TEXT Tracking Identifier "dx-<code value>"; UIDREF Tracking Unique Identifier
          CODE Finding = the diagnosis code (pacs_bridge.codes)
          CODE Finding Site = (12738006, SCT, "Brain") for a head study         [TID 1501 row 6]
          TEXT Algorithm Name, Algorithm Version                                [TID 4019]
          NUM  (122157, DCM, "Probability"), UCUM "1", 0-1                      [TID 300]
          NUM  (OPERATING-POINT, 99PRIMA, "Operating point threshold"), UCUM "1" [TID 300]
          NUM  (ATTRIB-WEIGHT, 99PRIMA, "Attribution weight"), UCUM "1"         [TID 300], one per region
            INFERRED FROM SCOORD POLYLINE, closed                               [TID 320]
              SELECTED FROM IMAGE, the source image
          CODE (705057003, SCT, "Presence") = Present | Absent | Undetermined   [TID 1501 row 11]
        CONTAINS CONTAINER Measurement Group, one per zero-shot finding         [TID 1501]
          TEXT Tracking Identifier "zs-<code value>"; UIDREF Tracking Unique Identifier
          CODE Finding = the finding code (pacs_bridge.codes, chest/CT codes included)
          TEXT Algorithm Name = the zero-shot method, e.g. "medimageinsight-zero-shot",  [TID 4019]
               Algorithm Version; TEXT Algorithm Parameters ("prompts=<table>", "knn_weight=<w>")
          NUM  Probability, NUM Operating point threshold, CODE Presence         [TID 300, TID 1501 row 11]
        CONTAINS CONTAINER Measurement Group, one per similar prior study       [TID 1501]
          TEXT Tracking Identifier "prior-<keyed hash>" (never the other study's UID)
          CODE Finding = (SIMILAR-PRIOR, 99PRIMA, "Similar prior study"); TID 4019
          NUM  (SIMILARITY, 99PRIMA, "Similarity to this study"), UCUM "1"
          CODE (CONFIRMED-DX, 99PRIMA) = a diagnosis of its final report, 0-n   [TID 1501 row 11]
      CONTAINS CONTAINER (C0034375, UMLS, "Qualitative Evaluations")            [TID 1500 row 12]
        CODE (260870009, SCT, "Priority") = Routine | Urgent | Stat             [row 13]
        CODE (3457005, SCT, "Patient referral") = CID 7030 service, 0-n         [row 13]
        TEXT (PRIORITY-SCORE, 99PRIMA, "Priority score") "<class>=<score>", 0-n [row 14]

A study the input adequacy gate turned away (:class:`~pacs_bridge.results.NotAnalysed`) gets the same document
with one measurement group whose Finding is (NOT-ANALYSED, 99PRIMA), and a Qualitative Evaluations container
holding CODE (AI-OUTCOME, 99PRIMA) = NOT-ANALYSED and one TEXT (NOT-ANALYSED-WHY, 99PRIMA) per reason; no
priority, no finding. Its Series Description starts "AI triage NOT ANALYSED".

Decisions worth knowing:

* Every finding of the result is written, in order, and its Presence says which it is (IHE AIR asks that a
  reader can tell them apart): Present = at or above its operating threshold (called); Undetermined = below it,
  listed only to show the differential (the worker tops the reported diagnoses up to ``report_top_k``); Absent =
  below it for a label the site has the model rule out (``model.report_absent``). A result without any finding
  is written as one group whose Finding is (NO-DX-REPORTED, 99PRIMA), because TID 1500 needs at least one
  measurement group; it reads back as no findings.
* A finding's explanation regions sit inside that finding's group: one "Attribution weight" NUM per region,
  inferred from a closed 2-D POLYLINE on its source image (TID 1501 -> TID 300 -> TID 320). TID 1410 groups
  would be siblings of the finding, tied to it only by a shared tracking UID; 2-D SCOORD is also what viewers
  render most reliably (dicom-results.md §1).
* Probabilities, thresholds, weights, priority scores and similarities read back exactly: a NUM carries a
  full-precision Floating Point Value (FD) beside its 16-character Numeric Value (DS), and TEXT items hold the
  shortest round-trip ``repr`` of the float. Polygon vertices are SCOORD Graphic Data, which is FL (32-bit):
  :func:`build_sr` rounds them to float32 and :func:`read_sr` returns those values, so results whose vertices
  are float32-representable (pixel corners, half pixels) read back equal, and others come back rounded.
* The row 12 container accepts only CODE and TEXT items (and TID 4019, whose TEXT items PixelMed then
  mismatches against row 14): priority class scores are therefore TEXT items with a private concept name, and
  the algorithm is identified in each measurement group.
* Zero-shot scores (text prompts against the image embedding) are findings of another algorithm than the
  heads or the kNN: each has its own group, tracked as "zs-<code>" under a UID of its own, whose TID 4019
  Algorithm Identification names the zero-shot method, its version and its parameters. They never decide the
  priority; :func:`read_sr` returns them as ``TriageResult.zero_shot``.
* Similar prior studies belong to other patients: the SR names them only by a pseudonymous reference (a keyed
  hash of the other study's UID, :func:`worker.slice_evidence.study_reference`), which the worklist resolves
  for authorised users; their findings are codes, their similarity a NUM. :func:`read_sr` returns them with an
  empty ``study_instance_uid`` and the ``reference``.
* SeriesDate/SeriesTime are set (the SR's creation), and descriptions are cut between words to fit 64 characters.
* Tracking UIDs are derived from (study, label), so a revised SR tracks a finding under the same UID.
"""
from __future__ import annotations

import math
import re
import uuid
from collections.abc import Collection, Container, Sequence
from copy import deepcopy

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid

from pacs_bridge import codes
from pacs_bridge.results import (
    Finding,
    ImageRegion,
    NotAnalysed,
    SimilarStudy,
    TriageResult,
    ZeroShotFindings,
)

#: Series Number of our SR series by default, and the range that :func:`is_our_sr` treats as ours.
DEFAULT_SERIES_NUMBER = 990
OUR_SERIES_NUMBERS = range(990, 1000)
DEFAULT_MANUFACTURER = "Triage Worker Project"
#: Manufacturer's Model Name (0008,1090) and Device Observer Model Name of the product.
PRODUCT_NAME = "triage-worker"
#: Start of the Series Description (0008,103E) of every SR we write; the model name and version follow.
SERIES_DESCRIPTION_PREFIX = "AI triage (not for diagnosis)"
#: Start of the Series Description of an SR that says the study was not analysed.
NOT_ANALYSED_DESCRIPTION_PREFIX = "AI triage NOT ANALYSED"

#: SR SOP classes :func:`read_sr` decodes (we write Comprehensive 3D SR; Comprehensive SR is the fallback).
_READABLE_SOP_CLASSES = {pydicom.uid.Comprehensive3DSRStorage, pydicom.uid.ComprehensiveSRStorage}
#: Read only: SRs written before the threshold was a NUM carried it as this TID 4019 parameter.
_THRESHOLD_PARAMETER = "threshold="
_PRESENCE_OF_CALL = {"present": codes.PRESENT, "absent": codes.ABSENT, "not called": codes.UNDETERMINED}
_CALL_OF_PRESENCE = {(c.scheme_designator, c.value): call for call, c in _PRESENCE_OF_CALL.items()}
_NO_DIAGNOSIS_TRACKING_ID = "dx-none"
_NOT_ANALYSED_TRACKING_ID = "not-analysed"
#: Tracking Identifier prefix of a zero-shot finding's group (a head's finding is "dx-<code>").
_ZERO_SHOT_TRACKING_PREFIX = "zs-"
#: What a pseudonymous reference to another study looks like (worker.slice_evidence.study_reference).
_REFERENCE = re.compile(r"prior-[0-9a-f]{32}")
_TRACKING_NAMESPACE = uuid.UUID("6f6e8f8e-2a4b-5c1d-9e0f-7472696167e5")
_LO_MAX = 64
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
#: Attributes that must agree across the evidence: one patient.
_PATIENT_IDENTITY = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")
#: Type 2 attributes highdicom reads from the first evidence instance without a default.
_TYPE2_FROM_EVIDENCE = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime",
)
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def build_sr(
    result: TriageResult | NotAnalysed,
    evidence: Sequence[pydicom.Dataset],
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int = 1,
    device_uid: str,
    device_name: str = PRODUCT_NAME,
    manufacturer: str = DEFAULT_MANUFACTURER,
    institution_name: str | None = None,
    previous_sr: pydicom.Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Encode a triage result as a preliminary, complete, unverified Comprehensive 3D SR.

    Parameters
    ----------
    result:
        The triage of one study version.
    evidence:
        Headers of the study's source instances (read with ``stop_before_pixels``); all must belong to
        ``result.study_instance_uid`` and to one patient. They are listed in the Current Requested Procedure
        Evidence Sequence, the patient and study attributes are copied from them, and the order they fulfil
        (Accession Number, Requested Procedure ID) goes to the Referenced Request Sequence.
    series_instance_uid, sop_instance_uid:
        UIDs of the SR; new ones by default. A revision (``previous_sr``) stays in the previous SR's series
        unless a series is given.
    series_number, instance_number:
        Series Number (keep it in :data:`OUR_SERIES_NUMBERS` for loop prevention) and Instance Number.
    device_uid:
        Device Observer UID: one stable UID per deployment.
    device_name, manufacturer, institution_name:
        Device Observer Name, Manufacturer (of the SR and of the device observer) and Institution Name.
    previous_sr:
        The SR this one revises (e.g. after late images re-opened the study), referenced in the Predecessor
        Documents Sequence.

    Raises
    ------
    ValueError
        When the evidence is empty, lacks a UID, or mixes studies or patients (naming the instance); when a
        region's image is not in the evidence or its polygon is not closed; when a label, referral or priority
        has no code; when a value cannot be encoded (not finite, empty).
    """
    evidence = _checked_evidence(result.study_instance_uid, evidence)
    instances = {ds.SOPInstanceUID: ds for ds in evidence}
    analysed = isinstance(result, TriageResult)
    _check_text("model_name", result.model_name)
    _check_text("model_version", result.model_version)
    device_uid = _checked_uid("device_uid", device_uid)
    if previous_sr is not None:
        _check_previous_sr(result.study_instance_uid, previous_sr)
        if series_instance_uid is None:
            series_instance_uid = previous_sr.SeriesInstanceUID
    series_instance_uid = _checked_uid("series_instance_uid", series_instance_uid or generate_uid())
    sop_instance_uid = _checked_uid("sop_instance_uid", sop_instance_uid or generate_uid())

    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dcm_codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid, name=device_name, manufacturer_name=manufacturer, model_name=PRODUCT_NAME,
            ),
        )
    )
    if not analysed:
        groups = [_not_analysed_group(result)]
    elif result.findings:
        sites = _finding_sites(evidence)
        groups = [_measurement_group(result, finding, instances, sites) for finding in result.findings]
    else:
        groups = [_no_diagnosis_group(result)]
    if analysed and result.zero_shot is not None:
        sites = _finding_sites(evidence)
        groups += [_zero_shot_group(result, result.zero_shot, finding, sites)
                   for finding in result.zero_shot.findings]
    if analysed:
        groups += [_similar_study_group(result, study) for study in result.similar_studies]
    procedures = _procedures(evidence)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=procedures,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(
        _qualitative_evaluations(result) if analysed else _not_analysed_evaluations(result))

    requests = _requested_procedures(result.study_instance_uid, evidence)
    description = SERIES_DESCRIPTION_PREFIX if analysed else NOT_ANALYSED_DESCRIPTION_PREFIX
    sr = hd.sr.Comprehensive3DSR(
        # A copy first: highdicom shares data elements of evidence[0] with the SR, and whoever edits the SR
        # must not edit the evidence.
        evidence=[_with_type2_defaults(deepcopy(evidence[0])), *evidence[1:]],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        performed_procedure_codes=_performed_procedures(evidence) or None,
        requested_procedures=requests or None,
        previous_versions=[previous_sr] if previous_sr is not None else None,
        record_evidence=True,
        series_description=_truncate(f"{description} - {result.model_name} {result.model_version}"),
        manufacturer_model_name=PRODUCT_NAME,
        software_versions=_truncate(f"{result.model_name} {result.model_version}"),
        coding_schemes=[codes.coding_scheme_identification()],
    )
    # Series Date/Time (Type 3 in the SR Document Series module) are what a PACS files a series under; without
    # them Orthanc lists the SR under "?". The series is made now, with the content.
    sr.SeriesDate, sr.SeriesTime = sr.ContentDate, sr.ContentTime
    return sr


def read_sr(ds: pydicom.Dataset) -> TriageResult:
    """Decode an SR written by :func:`build_sr` back to the triage result it encodes (see :func:`read_outcome`
    for SRs that may say the study was not analysed).

    ``read_sr(build_sr(r, evidence, ...)) == r`` for every result whose polygon vertices are
    float32-representable; other vertices come back rounded to float32 (see the module docstring).

    Raises
    ------
    ValueError
        When ``ds`` is not a TID 1500 Comprehensive (3D) SR of our layout, or says the study was not analysed;
        the message names its SOP Instance UID and the part that does not fit.
    """
    outcome = read_outcome(ds)
    if isinstance(outcome, NotAnalysed):
        raise ValueError(f"SR {ds.SOPInstanceUID} says study {outcome.study_instance_uid} was not analysed: "
                         + "; ".join(outcome.reasons))
    return outcome


def read_outcome(ds: pydicom.Dataset) -> TriageResult | NotAnalysed:
    """Decode an SR written by :func:`build_sr`: the triage result, or the not-analysed outcome with its reasons.

    Raises
    ------
    ValueError
        When ``ds`` is not a TID 1500 Comprehensive (3D) SR of our layout.
    """
    sop_uid = str(ds.get("SOPInstanceUID", "<no SOPInstanceUID>"))
    if ds.get("SOPClassUID") not in _READABLE_SOP_CLASSES:
        raise ValueError(f"SR {sop_uid}: SOP class {ds.get('SOPClassUID')} is not a Comprehensive (3D) SR")
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    except (AttributeError, KeyError, ValueError) as exc:
        raise ValueError(f"SR {sop_uid}: cannot parse the content tree: {exc}") from exc
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError(f"SR {sop_uid}: the root is not a TID 1500 Measurement Report")  # noqa: TRY004
    series_of = {str(sop): str(series) for _study, series, sop, _sop_class in sr.get_evidence()}

    groups = report.get_image_measurement_groups()
    if not groups:
        raise ValueError(f"SR {sop_uid}: no TID 1501 measurement group")
    # Every group identifies the algorithm (TID 4019); the first one speaks for the report.
    model_name = _text_value(groups[0][0], dcm_codes.DCM.AlgorithmName, f"SR {sop_uid}")
    model_version = _text_value(groups[0][0], dcm_codes.DCM.AlgorithmVersion, f"SR {sop_uid}")
    findings = []
    similar_studies: list[SimilarStudy] = []
    zero_shot: ZeroShotFindings | None = None
    not_analysed = False
    for group in groups:
        if group.finding_type is None:
            raise ValueError(f"SR {sop_uid}: measurement group {group.tracking_identifier!r} has no Finding")
        if _is_zero_shot_group(group):
            zero_shot = _read_zero_shot(group, zero_shot, series_of, f"SR {sop_uid}")
        elif group.finding_type == codes.NOT_ANALYSED:
            not_analysed = True
        elif group.finding_type == codes.SIMILAR_PRIOR_STUDY:
            similar_studies.append(_read_similar_study(group, f"SR {sop_uid}"))
        elif group.finding_type != codes.NO_DIAGNOSIS_REPORTED:
            findings.append(_read_finding(group, series_of, f"SR {sop_uid}"))

    evaluations = _single(
        hd.sr.utils.find_content_items(report[0], name=codes.QUALITATIVE_EVALUATIONS),
        f"SR {sop_uid}: Qualitative Evaluations container",
    )
    if not_analysed:
        reasons = tuple(str(item.TextValue) for item in evaluations.ContentSequence
                        if _concept_name(item) == codes.NOT_ANALYSED_REASON)
        return NotAnalysed(study_instance_uid=str(ds.StudyInstanceUID), pipeline="", reasons=reasons,
                           model_name=model_name, model_version=model_version)
    priority = None
    referrals: list[str] = []
    priority_scores: dict[str, float] = {}
    for item in evaluations.ContentSequence:
        name = _concept_name(item)
        if name == codes.PRIORITY:
            priority = codes.priority_for_code(hd.sr.CodeContentItem.from_dataset(item).value)
        elif name == codes.PATIENT_REFERRAL:
            referrals.append(codes.referral_for_code(hd.sr.CodeContentItem.from_dataset(item).value))
        elif name == codes.PRIORITY_SCORE:
            label, score = _parse_priority_score(item.TextValue, f"SR {sop_uid}")
            priority_scores[label] = score
        elif name == codes.SIMILAR_STUDY:  # SRs written before similar studies were measurement groups
            similar_studies.append(_parse_similar_study(item.TextValue, f"SR {sop_uid}"))
    if priority is None:
        raise ValueError(f"SR {sop_uid}: no Priority (260870009, SCT) in the Qualitative Evaluations")

    return TriageResult(
        study_instance_uid=str(ds.StudyInstanceUID),
        priority=priority,
        findings=tuple(findings),
        referrals=tuple(referrals),
        model_name=model_name,
        model_version=model_version,
        priority_scores=priority_scores,
        similar_studies=tuple(similar_studies),
        zero_shot=zero_shot,
    )


def is_our_sr(
    ds: pydicom.Dataset,
    *,
    manufacturer: str = DEFAULT_MANUFACTURER,
    device_uids: Collection[str] = (),
    series_numbers: Container[int] = OUR_SERIES_NUMBERS,
) -> bool:
    """Whether ``ds`` is an SR this product wrote, which must never trigger processing (loop prevention).

    True for an SR (Modality "SR") whose Manufacturer is ours, whose Series Number is in our range, whose
    Coding Scheme Identification Sequence declares 99PRIMA, or whose Device Observer UID is one of
    ``device_uids``. Headers suffice (C-FIND answers, ``stop_before_pixels`` reads) except for the device UID,
    which is in the content tree. A foreign SR in our series number range counts as ours, which is harmless:
    SRs are never processed.
    """
    if ds.get("Modality") != "SR":
        return False
    if manufacturer and ds.get("Manufacturer") == manufacturer:
        return True
    try:
        if int(ds.get("SeriesNumber")) in series_numbers:
            return True
    except (TypeError, ValueError):
        pass
    schemes = ds.get("CodingSchemeIdentificationSequence") or []
    if any(item.get("CodingSchemeDesignator") == codes.PRIVATE_SCHEME for item in schemes):
        return True
    if device_uids:
        for item in ds.get("ContentSequence") or []:
            if _concept_name(item) == dcm_codes.DCM.DeviceObserverUID and item.get("UID") in device_uids:
                return True
    return False


# --- encoding -----------------------------------------------------------------------------------------------

def _checked_evidence(study_uid: str, evidence: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The evidence without duplicate instances, once checked to be one study of one patient."""
    if len(evidence) == 0:
        raise ValueError(f"no evidence given for study {study_uid}: pass the headers of its source instances")
    unique: dict[str, pydicom.Dataset] = {}
    for index, ds in enumerate(evidence):
        for keyword in _REQUIRED_UIDS:
            if not ds.get(keyword):
                name = ds.get("SOPInstanceUID", "without SOP Instance UID")
                raise ValueError(f"evidence item {index} ({name}) lacks {keyword}")
        unique.setdefault(ds.SOPInstanceUID, ds)
    instances = list(unique.values())
    first = instances[0]
    for ds in instances:
        if ds.StudyInstanceUID != study_uid:
            raise ValueError(
                f"evidence instance {ds.SOPInstanceUID} (series {ds.SeriesInstanceUID}) belongs to study "
                f"{ds.StudyInstanceUID}, not to the triaged study {study_uid}"
            )
        for keyword in _PATIENT_IDENTITY:
            if str(ds.get(keyword, "")) != str(first.get(keyword, "")):
                # The values are patient data: name the attribute and the instances, never the values.
                raise ValueError(
                    f"evidence instance {ds.SOPInstanceUID} (series {ds.SeriesInstanceUID}) differs in "
                    f"{keyword} from instance {first.SOPInstanceUID} of the same study {study_uid}: "
                    "the evidence mixes patients"
                )
    return instances


def _with_type2_defaults(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with empty values for the Type 2 attributes highdicom reads from it (some images lack them)."""
    for keyword in _TYPE2_FROM_EVIDENCE:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def _check_previous_sr(study_uid: str, previous_sr: pydicom.Dataset) -> None:
    for keyword in _REQUIRED_UIDS:
        if not previous_sr.get(keyword):
            raise ValueError(f"previous_sr {previous_sr.get('SOPInstanceUID', '')} lacks {keyword}")
    if previous_sr.StudyInstanceUID != study_uid:
        raise ValueError(
            f"previous_sr {previous_sr.SOPInstanceUID} belongs to study {previous_sr.StudyInstanceUID}, "
            f"not to the triaged study {study_uid}"
        )


def _checked_uid(what: str, uid: str) -> str:
    if not UID(uid).is_valid:
        raise ValueError(f"{what} {uid!r} is not a valid DICOM UID")
    return str(uid)


def _check_text(what: str, value: str) -> None:
    if not value or not value.strip():
        raise ValueError(f"{what} {value!r} is empty; TID 4019 Algorithm Identification needs it")


def _finite(what: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}: only finite numbers can be encoded")
    return value


def _truncate(text: str) -> str:
    """``text`` fitted to the 64 characters of a LO value, cut between words (plain ASCII: the character set is
    the evidence's); a single word longer than that is cut where it must be."""
    text = " ".join(text.split())
    if len(text) <= _LO_MAX:
        return text
    cut = text[: _LO_MAX + 1].rsplit(" ", 1)[0].rstrip(" -")
    return cut if cut and len(cut) <= _LO_MAX else text[:_LO_MAX]


def _procedures(evidence: Sequence[pydicom.Dataset]) -> list[Code]:
    """TID 1500 "Procedure reported": the CID 100 code of each modality of the evidence."""
    return list(dict.fromkeys(codes.procedure_reported(str(ds.get("Modality", ""))) for ds in evidence))


def _finding_sites(evidence: Sequence[pydicom.Dataset]) -> list[hd.sr.FindingSite]:
    """The Finding Site of the study's findings, from its body part (one region, else none)."""
    sites = {codes.finding_site(str(ds.get("BodyPartExamined") or "")) for ds in evidence}
    sites.discard(None)
    return [hd.sr.FindingSite(anatomic_location=sites.pop())] if len(sites) == 1 else []


def _performed_procedures(evidence: Sequence[pydicom.Dataset]) -> list[Code]:
    """Performed Procedure Code Sequence: the study's own Procedure Code Sequence (0008,1032) where the images
    carry one (what the RIS ordered and the modality performed), else the region-specific procedure the
    modality and body part name (MR Brain, CT Head), else none."""
    from_study: dict[tuple[str, str], Code] = {}
    for ds in evidence:
        for item in ds.get("ProcedureCodeSequence") or []:
            try:
                code = hd.sr.CodedConcept.from_dataset(item)
            except (AttributeError, TypeError, ValueError):
                continue  # an incomplete code item in an image header is not ours to repair
            from_study.setdefault((code.scheme_designator, code.value), code)
    if from_study:
        return list(from_study.values())
    derived = (codes.performed_procedure(str(ds.get("Modality", "")), str(ds.get("BodyPartExamined") or ""))
               for ds in evidence)
    return list(dict.fromkeys(code for code in derived if code is not None))


def _tracking_uid(study_instance_uid: str, key: str) -> str:
    """A UID derived from (study, finding), so that a revised SR tracks the finding under the same UID.

    A name-based UUID under the 2.25 root (PS3.5 B.2); pydicom's ``generate_uid`` ignores entropy sources
    when it makes 2.25 UIDs.
    """
    return f"2.25.{uuid.uuid5(_TRACKING_NAMESPACE, f'{study_instance_uid}/{key}').int}"


def _algorithm_identification(result: TriageResult | NotAnalysed, parameters: Sequence[str] | None = None
                              ) -> hd.sr.AlgorithmIdentification:
    # No Algorithm Manufacturer (TEXT 122405): the PixelMed template tables do not know it and warn
    # (dicom-results.md §2); the vendor is the Device observer's manufacturer.
    return hd.sr.AlgorithmIdentification(name=result.model_name, version=result.model_version,
                                         parameters=parameters)


def _measurement_group(result: TriageResult, finding: Finding, instances: dict[str, pydicom.Dataset],
                       finding_sites: Sequence[hd.sr.FindingSite] = ()
                       ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of one finding: its code, probability, threshold and explanation regions."""
    code = codes.code_for_label(finding.label)
    threshold = _finite(f"threshold of finding {finding.label!r}", finding.threshold)
    measurements = [
        hd.sr.Measurement(
            name=codes.PROBABILITY,
            value=_finite(f"probability of finding {finding.label!r}", finding.probability),
            unit=codes.UNIT_ONE,
        ),
        hd.sr.Measurement(name=codes.OPERATING_THRESHOLD, value=threshold, unit=codes.UNIT_ONE),
    ]
    for index, region in enumerate(finding.regions):
        measurements.append(_attribution(f"region {index} of finding {finding.label!r}", region, instances))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(result.study_instance_uid, finding.label), identifier=f"dx-{code.value}"),
        finding_type=code,
        algorithm_id=_algorithm_identification(result),
        finding_sites=list(finding_sites) or None,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PRESENCE, _PRESENCE_OF_CALL[finding.call])],
    )


def _zero_shot_group(result: TriageResult, zero_shot: ZeroShotFindings, finding: Finding,
                     finding_sites: Sequence[hd.sr.FindingSite] = ()
                     ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of one zero-shot finding: its code, score and threshold, identified as the zero-shot
    method's (TID 4019 with the method's name, version and parameters), tracked apart from the heads' finding."""
    code = codes.code_for_label(finding.label)
    _check_text("zero-shot method", zero_shot.method)
    _check_text("zero-shot version", zero_shot.version)
    for parameter in zero_shot.parameters:
        _check_text("zero-shot parameter", parameter)
    what = f"zero-shot finding {finding.label!r}"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(result.study_instance_uid, f"zero-shot/{finding.label}"),
            identifier=f"{_ZERO_SHOT_TRACKING_PREFIX}{code.value}"),
        finding_type=code,
        algorithm_id=hd.sr.AlgorithmIdentification(name=zero_shot.method, version=zero_shot.version,
                                                   parameters=list(zero_shot.parameters) or None),
        finding_sites=list(finding_sites) or None,
        measurements=[
            hd.sr.Measurement(name=codes.PROBABILITY, value=_finite(f"probability of {what}", finding.probability),
                              unit=codes.UNIT_ONE),
            hd.sr.Measurement(name=codes.OPERATING_THRESHOLD, value=_finite(f"threshold of {what}",
                                                                              finding.threshold),
                              unit=codes.UNIT_ONE),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PRESENCE, _PRESENCE_OF_CALL[finding.call])],
    )


def _attribution(what: str, region: ImageRegion, instances: dict[str, pydicom.Dataset]) -> hd.sr.Measurement:
    """NUM "Attribution weight" inferred from a closed POLYLINE on the region's source image (TID 300/320)."""
    image = instances.get(region.sop_instance_uid)
    if image is None:
        raise ValueError(f"{what} is on image {region.sop_instance_uid}, which is not in the evidence")
    if image.SOPClassUID != region.sop_class_uid or image.SeriesInstanceUID != region.series_instance_uid:
        raise ValueError(
            f"{what} names image {region.sop_instance_uid} with SOP class {region.sop_class_uid} in series "
            f"{region.series_instance_uid}, but the evidence has SOP class {image.SOPClassUID} in series "
            f"{image.SeriesInstanceUID}"
        )
    polygon = np.asarray(region.polygon, dtype=float)
    if polygon.ndim != 2 or polygon.shape[1] != 2 or len(polygon) < 4:
        raise ValueError(f"{what}: the polygon needs 4 or more (column, row) points; shape {polygon.shape}")
    if not np.all(np.isfinite(polygon)):
        raise ValueError(f"{what}: the polygon has coordinates that are not finite")
    if not np.array_equal(polygon[0], polygon[-1]):
        raise ValueError(f"{what}: the polygon is not closed (first point {polygon[0]}, last {polygon[-1]})")
    coordinates = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        # Graphic Data is FL: round now, so that the dataset in memory says what its file will say.
        graphic_data=polygon.astype(np.float32).astype(float),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=region.sop_class_uid,
            referenced_sop_instance_uid=region.sop_instance_uid,
        ),
    )
    return hd.sr.Measurement(
        name=codes.ATTRIBUTION_WEIGHT,
        value=_finite(f"weight of {what}", region.weight),
        unit=codes.UNIT_ONE,
        referenced_coordinates=[coordinates],
    )


def _no_diagnosis_group(result: TriageResult) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The one group of a result without findings (TID 1500 needs at least one measurement group)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(result.study_instance_uid, _NO_DIAGNOSIS_TRACKING_ID),
            identifier=_NO_DIAGNOSIS_TRACKING_ID,
        ),
        finding_type=codes.NO_DIAGNOSIS_REPORTED,
        algorithm_id=_algorithm_identification(result),
    )


def _qualitative_evaluations(result: TriageResult) -> hd.sr.ContainerContentItem:
    """The TID 1500 row 12 container: priority, referrals, priority class scores, similar prior studies."""
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(codes.PRIORITY, codes.code_for_priority(result.priority), _CONTAINS)
    ]
    for service in result.referrals:
        referral = codes.code_for_referral(service)
        items.append(hd.sr.CodeContentItem(codes.PATIENT_REFERRAL, referral, _CONTAINS))
    for label, score in result.priority_scores.items():
        score = _finite(f"priority score {label!r}", score)
        items.append(hd.sr.TextContentItem(codes.PRIORITY_SCORE, f"{label}={score!r}", _CONTAINS))
    container = hd.sr.ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _similar_study_group(result: TriageResult, study: SimilarStudy) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group for one similar prior study, naming it only by its pseudonymous reference.

    The other study belongs to another patient: its UID never enters this SR. Its tracking identifier is the
    reference (a keyed hash the worklist resolves for authorised users), its similarity a NUM, and each finding
    of its final report a CODE "Finding confirmed by its final report" (labels without a code are left out).
    """
    reference = study.reference.strip()
    if not _REFERENCE.fullmatch(reference):
        raise ValueError(
            f"similar study of {result.study_instance_uid} has no pseudonymous reference ({reference!r}): set "
            "SimilarStudy.reference (worker.slice_evidence.study_reference); the SR never names another study")
    similarity = _finite(f"similarity of similar study {reference}", study.similarity)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(result.study_instance_uid, f"similar/{reference}"), identifier=reference),
        finding_type=codes.SIMILAR_PRIOR_STUDY,
        algorithm_id=_algorithm_identification(result),
        measurements=[hd.sr.Measurement(name=codes.SIMILARITY, value=similarity, unit=codes.UNIT_ONE)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.CONFIRMED_FINDING, codes.code_for_label(label))
            for label in study.findings if label in codes.DIAGNOSIS_CODES
        ] or None,
    )


def _not_analysed_group(outcome: NotAnalysed) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The one group of a not-analysed SR (TID 1500 needs one): its finding says no analysis was made."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(outcome.study_instance_uid, _NOT_ANALYSED_TRACKING_ID),
            identifier=_NOT_ANALYSED_TRACKING_ID),
        finding_type=codes.NOT_ANALYSED,
        algorithm_id=_algorithm_identification(outcome),
    )


def _not_analysed_evaluations(outcome: NotAnalysed) -> hd.sr.ContainerContentItem:
    """The row 12 container of a not-analysed SR: the outcome, and one TEXT per reason. No priority: none was
    judged, and a reader must not take the absence of a finding for a normal study."""
    items: list[hd.sr.ContentItem] = [hd.sr.CodeContentItem(codes.AI_OUTCOME, codes.NOT_ANALYSED, _CONTAINS)]
    for reason in outcome.reasons:
        items.append(hd.sr.TextContentItem(codes.NOT_ANALYSED_REASON, reason.strip(), _CONTAINS))
    container = hd.sr.ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _requested_procedures(study_uid: str, evidence: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Referenced Request Sequence (0040,A370) items, one per (Accession Number, Requested Procedure ID).

    Taken from each instance's Request Attributes Sequence, else from its Accession Number; none when the
    evidence has neither.
    """
    requests: dict[tuple[str, str], pydicom.Dataset] = {}
    for ds in evidence:
        accession = str(ds.get("AccessionNumber") or "")
        for attributes in ds.get("RequestAttributesSequence") or [pydicom.Dataset()]:
            key = (str(attributes.get("AccessionNumber") or accession),
                   str(attributes.get("RequestedProcedureID") or ""))
            if key == ("", "") or key in requests:
                continue
            request = pydicom.Dataset()
            request.StudyInstanceUID = study_uid
            request.ReferencedStudySequence = []
            request.AccessionNumber, request.RequestedProcedureID = key
            issuer = (attributes.get("IssuerOfAccessionNumberSequence")
                      or ds.get("IssuerOfAccessionNumberSequence"))
            if issuer:
                request.IssuerOfAccessionNumberSequence = deepcopy(issuer)
            request.PlacerOrderNumberImagingServiceRequest = ""
            request.FillerOrderNumberImagingServiceRequest = ""
            request.RequestedProcedureDescription = attributes.get("RequestedProcedureDescription", "")
            procedure_codes = attributes.get("RequestedProcedureCodeSequence") or []
            request.RequestedProcedureCodeSequence = deepcopy(procedure_codes)
            requests[key] = request
    return list(requests.values())


# --- decoding -----------------------------------------------------------------------------------------------

def _concept_name(item: pydicom.Dataset) -> hd.sr.CodedConcept | None:
    sequence = item.get("ConceptNameCodeSequence")
    return hd.sr.CodedConcept.from_dataset(sequence[0]) if sequence else None


def _single(items: Sequence[pydicom.Dataset], what: str) -> pydicom.Dataset:
    if len(items) != 1:
        raise ValueError(f"{what}: expected exactly one, found {len(items)}")
    return items[0]


def _text_value(parent: pydicom.Dataset, name: Code, where: str) -> str:
    items = hd.sr.utils.find_content_items(parent, name=name)
    return str(_single(items, f"{where}: {name.meaning}").TextValue)


def _parse_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: {text!r} is not finite")
    return value


def _parse_priority_score(text: str, where: str) -> tuple[str, float]:
    label, separator, score = text.rpartition("=")
    if not separator:
        raise ValueError(f"{where}: priority score {text!r} is not '<class>=<score>'")
    return label, _parse_float(score, f"{where}: priority score {label!r}")


def _read_similar_study(group: hd.sr.MeasurementsAndQualitativeEvaluations, where: str) -> SimilarStudy:
    reference = str(_text_value(group[0], dcm_codes.DCM.TrackingIdentifier, f"{where}: similar prior study"))
    what = f"{where}: similar prior study {reference}"
    similarity = _single(group.get_measurements(name=codes.SIMILARITY), f"{what}: Similarity").value
    findings = tuple(codes.label_for_code(hd.sr.CodeContentItem.from_dataset(item).value)
                     for item in hd.sr.utils.find_content_items(group[0], name=codes.CONFIRMED_FINDING))
    return SimilarStudy(study_instance_uid="", similarity=float(similarity), findings=findings, reference=reference)


def _parse_similar_study(text: str, where: str) -> SimilarStudy:
    import json

    what = f"{where}: similar prior study {text!r}"
    try:
        record = json.loads(text)
        return SimilarStudy(
            study_instance_uid=str(record["study_instance_uid"]),
            similarity=_parse_float(repr(record["similarity"]), what),
            findings=tuple(str(label) for label in record["findings"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{what} is not the JSON object build_sr writes: {exc}") from None


def _is_zero_shot_group(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> bool:
    identifiers = hd.sr.utils.find_content_items(group[0], name=dcm_codes.DCM.TrackingIdentifier)
    return bool(identifiers) and str(identifiers[0].TextValue).startswith(_ZERO_SHOT_TRACKING_PREFIX)


def _read_zero_shot(group: hd.sr.MeasurementsAndQualitativeEvaluations, so_far: ZeroShotFindings | None,
                    series_of: dict[str, str], where: str) -> ZeroShotFindings:
    """``so_far`` with the zero-shot finding of ``group`` added; every zero-shot group must name one method."""
    method = _text_value(group[0], dcm_codes.DCM.AlgorithmName, f"{where}: zero-shot finding")
    version = _text_value(group[0], dcm_codes.DCM.AlgorithmVersion, f"{where}: zero-shot finding")
    parameters = tuple(str(item.TextValue) for item in hd.sr.utils.find_content_items(
        group[0], name=dcm_codes.DCM.AlgorithmParameters, recursive=True))
    finding = _read_finding(group, series_of, f"{where}: zero-shot")
    if so_far is None:
        return ZeroShotFindings(method, version, (finding,), parameters)
    if (so_far.method, so_far.version) != (method, version):
        raise ValueError(f"{where}: zero-shot findings of two methods ({so_far.method} {so_far.version}, "
                         f"{method} {version})")
    return ZeroShotFindings(method, version, (*so_far.findings, finding), so_far.parameters)


def _read_finding(group: hd.sr.MeasurementsAndQualitativeEvaluations, series_of: dict[str, str], where: str
                  ) -> Finding:
    label = codes.label_for_code(group.finding_type)
    what = f"{where}: finding {label!r}"
    numeric = group.get_measurements(name=codes.OPERATING_THRESHOLD)
    if numeric:
        threshold = float(_single(numeric, f"{what}: Operating point threshold").value)
    else:  # an SR of an earlier version: the threshold as a TID 4019 parameter
        parameters = hd.sr.utils.find_content_items(group[0], name=dcm_codes.DCM.AlgorithmParameters,
                                                    recursive=True)
        thresholds = [str(item.TextValue).removeprefix(_THRESHOLD_PARAMETER) for item in parameters
                      if str(item.TextValue).startswith(_THRESHOLD_PARAMETER)]
        threshold = _parse_float(_single(thresholds, f"{what}: threshold parameter"), f"{what}: threshold")
    probability = _single(group.get_measurements(name=codes.PROBABILITY), f"{what}: Probability").value
    presence = [hd.sr.CodeContentItem.from_dataset(item).value
                for item in hd.sr.utils.find_content_items(group[0], name=codes.PRESENCE)]
    call = _CALL_OF_PRESENCE.get((presence[0].scheme_designator, presence[0].value)) if presence else None

    regions = []
    for measurement in group.get_measurements(name=codes.ATTRIBUTION_WEIGHT):
        coordinates = _single(measurement.referenced_coordinates, f"{what}: coordinates of an attribution")
        image = hd.sr.ImageContentItem.from_dataset(
            _single(coordinates.ContentSequence, f"{what}: source image of an attribution"))
        sop_instance_uid = str(image.referenced_sop_instance_uid)
        if sop_instance_uid not in series_of:
            raise ValueError(f"{what}: region image {sop_instance_uid} is not in the SR's evidence")
        regions.append(ImageRegion(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=str(image.referenced_sop_class_uid),
            series_instance_uid=series_of[sop_instance_uid],
            polygon=tuple((float(np.float32(c)), float(np.float32(r))) for c, r in coordinates.value),
            weight=float(measurement.value),
        ))
    return Finding(label=label, probability=float(probability), threshold=threshold, regions=tuple(regions),
                   reported_absent=call == "absent")
