"""The triage SR: what it says, that it reads back, and that dciodvfy, dsrdump and PixelMed accept it."""
from __future__ import annotations

import copy
import re

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pacs_bridge import codes
from pacs_bridge.results import Finding, ImageRegion, NotAnalysed, SimilarStudy, TriageResult
from pacs_bridge.sr import (
    DEFAULT_MANUFACTURER,
    SERIES_DESCRIPTION_PREFIX,
    build_sr,
    is_our_sr,
    read_outcome,
    read_sr,
)
from pacs_bridge.study_reference import study_reference
from tests.support.sr_cases import (  # noqa: F401 (fixtures)
    CASES,
    PRIMA_LABELS,
    hydrocephalus,
    infarct,
    region,
    study,
    subdural_haemorrhage,
    tumour,
    written,
)
from tests.support.sr_checks import DEVICE_UID, SITE_KEY, mr_study

# --- one result per phantom lesion type ---------------------------------------------------------------------


# --- validators ---------------------------------------------------------------------------------------------


# --- round trip and content ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_read_sr_of_the_written_file_gives_the_same_result(written, case):
    result, path = written[case]
    back = read_outcome(pydicom.dcmread(path))
    if isinstance(result, NotAnalysed):  # the pipeline is the worker's bookkeeping, not the SR's
        result = NotAnalysed(result.study_instance_uid, "", result.reasons, result.model_name, result.model_version)
    assert back == result


def test_read_sr_of_the_built_dataset_gives_the_same_result(study):
    result = subdural_haemorrhage(study)
    assert read_sr(build_sr(result, study, device_uid=DEVICE_UID)) == result


def test_probabilities_and_similarities_read_back_at_full_precision(written):
    back = read_sr(pydicom.dcmread(written["subdural_haemorrhage"][1]))
    assert back.findings[0].probability == 0.9731418204307556
    assert back.similar_studies[0].similarity == 0.9412345678901234


def test_polygon_vertices_are_stored_as_32_bit_floats(study):
    result = TriageResult(study[0].StudyInstanceUID, "urgent",
                          (Finding("structural_edema", 0.7, 0.5, (region(study[3], 10.1, 20.2, 0.5),)),))
    vertex = read_sr(build_sr(result, study, device_uid=DEVICE_UID)).findings[0].regions[0].polygon[0]
    assert vertex == (10.100000381469727, 20.200000762939453)


def test_each_finding_is_a_tid_1501_group_with_code_probability_and_algorithm(written):
    ds = pydicom.dcmread(written["subdural_haemorrhage"][1])
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()
    assert [g.finding_type.value for g in groups] == ["35486000", "46963008", "STRUCT-MLS", "SIMILAR-PRIOR",
                                                      "SIMILAR-PRIOR"]
    first = groups[0]
    assert first.tracking_identifier == "dx-35486000"
    assert first.get_measurements(name=codes.PROBABILITY)[0].unit == codes.UNIT_ONE
    [threshold] = first.get_measurements(name=codes.OPERATING_THRESHOLD)
    assert (threshold.value, threshold.unit) == (0.41, codes.UNIT_ONE)
    [site] = first.finding_sites
    assert site.value == Code("12738006", "SCT", "Brain")
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
             for item in first[0].ContentSequence if item.ValueType == "TEXT"}
    assert texts["Algorithm Name"] == "prima" and texts["Algorithm Version"] == "1.0.7+tiny"
    assert "Algorithm Parameters" not in texts  # the threshold is a number with a unit, not the text "threshold="
    assert "Algorithm Manufacturer" not in texts
    assert len(first.get_measurements(name=codes.ATTRIBUTION_WEIGHT)) == 3


def test_the_header_says_what_made_the_sr_and_which_order_it_answers(written, study):
    ds = pydicom.dcmread(written["subdural_haemorrhage"][1])
    assert ds.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and ds.Modality == "SR"
    assert ds.SeriesDescription == f"{SERIES_DESCRIPTION_PREFIX} - prima 1.0.7+tiny"
    assert ds.SeriesNumber == 990 and ds.Manufacturer == DEFAULT_MANUFACTURER
    flags = (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag)
    assert flags == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert (ds.PatientID, ds.StudyInstanceUID, ds.AccessionNumber) == (
        "PAT-0042", study[0].StudyInstanceUID, "ACC20260114-17")
    [request] = ds.ReferencedRequestSequence
    assert (request.AccessionNumber, request.RequestedProcedureID) == ("ACC20260114-17", "RP-5521")
    [procedure] = ds.PerformedProcedureCodeSequence
    assert (procedure.CodeValue, procedure.CodingSchemeDesignator) == ("24590-2", "LN")
    [scheme] = ds.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99PRIMA"
    assert scheme.CodingSchemeVersion == codes.CODE_TABLE_VERSION
    [evidence] = ds.CurrentRequestedProcedureEvidenceSequence
    referenced = {item.ReferencedSOPInstanceUID
                  for series in evidence.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert referenced == {header.SOPInstanceUID for header in study}  # all 300, not only those with regions


def test_study_level_evaluations_carry_priority_and_referrals(written):
    ds = pydicom.dcmread(written["tumour"][1])
    [evaluations] = [item for item in ds.ContentSequence
                     if item.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value]
    coded = [(item.ConceptNameCodeSequence[0].CodeMeaning, item.ConceptCodeSequence[0].CodeMeaning)
             for item in evaluations.ContentSequence if item.ValueType == "CODE"]
    assert coded == [("Priority", "Urgent"), ("Patient referral", "Clinical Oncology"),
                     ("Patient referral", "Neurosurgery")]


def test_an_sr_without_any_finding_still_has_one_measurement_group(written):
    ds = pydicom.dcmread(written["no_finding"][1])
    [group] = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()
    assert group.finding_type == codes.NO_DIAGNOSIS_REPORTED
    assert read_sr(ds).findings == ()


def test_evidence_without_an_order_gives_no_referenced_request(study):
    bare = copy.deepcopy(study[:3])
    for ds in bare:
        ds.AccessionNumber = ""
        del ds.RequestAttributesSequence
    sr = build_sr(hydrocephalus(bare), bare, device_uid=DEVICE_UID)
    assert "ReferencedRequestSequence" not in sr


def test_ct_evidence_reports_a_ct_procedure_and_no_mr_brain_code(study):
    ct = copy.deepcopy(study[:4])
    for ds in ct:
        ds.Modality, ds.SOPClassUID, ds.BodyPartExamined = "CT", pydicom.uid.CTImageStorage, "CHEST"
    sr = build_sr(hydrocephalus(ct), ct, device_uid=DEVICE_UID)
    [procedure] = [item for item in sr.ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeMeaning == "Procedure reported"]
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"
    assert len(sr.PerformedProcedureCodeSequence) == 0


def test_the_procedure_comes_from_the_study_ct_head_and_the_images_own_procedure_code(study):
    ct = copy.deepcopy(study[:4])
    for ds in ct:
        ds.Modality, ds.SOPClassUID, ds.BodyPartExamined = "CT", pydicom.uid.CTImageStorage, "HEAD"
    [performed] = build_sr(hydrocephalus(ct), ct, device_uid=DEVICE_UID).PerformedProcedureCodeSequence
    assert (performed.CodeValue, performed.CodingSchemeDesignator, performed.CodeMeaning) == ("24725-4", "LN",
                                                                                           "CT Head")
    ordered = pydicom.Dataset()
    ordered.CodeValue, ordered.CodingSchemeDesignator, ordered.CodeMeaning = "RPID4583", "RADLEX", "CT HEAD WO IV"
    for ds in ct:
        ds.ProcedureCodeSequence = [ordered]
    [performed] = build_sr(hydrocephalus(ct), ct, device_uid=DEVICE_UID).PerformedProcedureCodeSequence
    assert (performed.CodeValue, performed.CodingSchemeDesignator) == ("RPID4583", "RADLEX")


def test_a_reader_tells_called_not_called_and_absent_findings_apart(written):
    """IHE AIR: each finding's Presence (SCT 705057003) says whether the model called it, read with highdicom."""
    ds = pydicom.dcmread(written["hydrocephalus"][1])
    groups = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()
    presence = {}
    for group in groups:
        [item] = hd.sr.utils.find_content_items(group[0], name=codes.PRESENCE)
        presence[group.finding_type.meaning] = hd.sr.CodeContentItem.from_dataset(item).value.meaning
    assert presence == {"Ventriculomegaly": "Present", "Cerebral atrophy": "Undetermined",
                        "Subdural intracranial hemorrhage": "Absent"}
    assert [f.call for f in read_sr(ds).findings] == ["present", "not called", "absent"]


def test_series_date_and_time_are_set_and_descriptions_are_never_cut_mid_word(study):
    result = TriageResult(study[0].StudyInstanceUID, "routine", (), model_name="prima-large-ensemble",
                          model_version="2026.11.3+cuda12-experimental-calibrated-thresholds")
    sr = build_sr(result, study, device_uid=DEVICE_UID)
    assert sr.SeriesDate == sr.ContentDate and sr.SeriesTime == sr.ContentTime and sr.SeriesDate
    assert len(sr.SeriesDescription) <= 64
    assert sr.SeriesDescription == f"{SERIES_DESCRIPTION_PREFIX} - prima-large-ensemble"


def test_similar_studies_are_structured_and_name_no_other_patients_study(study, tmp_path):
    """The worker knows the other studies' UIDs; the SR carries only their keyed-hash references."""
    others = [generate_uid(), generate_uid()]
    result = TriageResult(study[0].StudyInstanceUID, "stat", (Finding("trauma_subdural_hematoma", 0.9, 0.41),),
                          similar_studies=tuple(SimilarStudy(uid, 0.9 - i / 10, ("trauma_subdural_hematoma",),
                                                             reference=study_reference(SITE_KEY, uid))
                                                for i, uid in enumerate(others)))
    path = tmp_path / "sr.dcm"
    build_sr(result, study, device_uid=DEVICE_UID).save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    assert not any(uid.encode() in raw for uid in others)
    assert b"SIMILAR-STUDY" not in raw  # no private TEXT item with JSON any more
    back = read_sr(pydicom.dcmread(path))
    assert [(s.study_instance_uid, s.reference, s.similarity, s.findings) for s in back.similar_studies] == [
        ("", study_reference(SITE_KEY, uid), 0.9 - i / 10, ("trauma_subdural_hematoma",))
        for i, uid in enumerate(others)]
    from pacs_bridge.study_reference import resolve

    assert resolve(SITE_KEY, [s.reference for s in back.similar_studies], [generate_uid(), *others]) == {
        study_reference(SITE_KEY, uid): uid for uid in others}
    with pytest.raises(ValueError, match="pseudonymous reference"):
        build_sr(TriageResult(study[0].StudyInstanceUID, "routine", (), similar_studies=(
            SimilarStudy(others[0], 0.5),)), study, device_uid=DEVICE_UID)


def test_a_not_analysed_sr_says_why_and_carries_no_priority_or_finding(written):
    ds = pydicom.dcmread(written["not_analysed"][1])
    assert ds.SeriesDescription.startswith("AI triage NOT ANALYSED")
    [group] = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()
    assert group.finding_type == codes.NOT_ANALYSED
    [evaluations] = [item for item in ds.ContentSequence
                     if item.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value]
    names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in evaluations.ContentSequence]
    assert names == ["AI analysis outcome", "Reason not analysed", "Reason not analysed"]
    assert "Priority" not in names
    outcome = read_outcome(ds)
    assert isinstance(outcome, NotAnalysed) and "required series /(?i)adc/ is missing" in outcome.reasons[0]
    with pytest.raises(ValueError, match="not analysed"):
        read_sr(ds)


def test_editing_the_sr_leaves_the_evidence_alone(study):
    sr = build_sr(infarct(study), study, device_uid=DEVICE_UID)
    sr.PatientName, sr.StudyInstanceUID = "Changed^After", generate_uid()
    assert (study[0].PatientName, study[0].StudyInstanceUID) == ("Doe^Jane", study[1].StudyInstanceUID)


# --- revision -----------------------------------------------------------------------------------------------


def test_a_revision_tracks_each_finding_under_the_same_uid(study):
    def tracking_uids(sr):
        groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
        return [group.tracking_uid for group in groups]

    first = build_sr(tumour(study), study, device_uid=DEVICE_UID)
    revised = build_sr(tumour(study), study, device_uid=DEVICE_UID, previous_sr=first, instance_number=2)
    assert tracking_uids(revised) == tracking_uids(first)
    assert len(set(tracking_uids(first))) == 3


def test_a_previous_sr_of_another_study_is_refused(study):
    other = build_sr(infarct(study), study, device_uid=DEVICE_UID)
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="previous_sr .* belongs to study"):
        build_sr(infarct(study), study, device_uid=DEVICE_UID, previous_sr=other)


# --- bad input ----------------------------------------------------------------------------------------------

def test_evidence_from_another_study_is_refused_naming_the_instance(study):
    stranger = mr_study(series=1, slices=1)[0]
    with pytest.raises(ValueError, match=re.escape(stranger.SOPInstanceUID)) as error:
        build_sr(infarct(study), [*study[:5], stranger], device_uid=DEVICE_UID)
    assert "not to the triaged study" in str(error.value)


def test_evidence_of_another_patient_is_refused_without_printing_patient_data(study):
    mixed = copy.deepcopy(study[7])
    mixed.PatientID = "PAT-9999"
    with pytest.raises(ValueError, match=re.escape(mixed.SOPInstanceUID)) as error:
        build_sr(infarct(study), [*study[:5], mixed], device_uid=DEVICE_UID)
    assert "PatientID" in str(error.value)
    assert "PAT-9999" not in str(error.value) and "PAT-0042" not in str(error.value)


def test_a_region_on_an_image_outside_the_evidence_is_refused(study):
    outside = mr_study(series=1, slices=1)[0]
    outside.StudyInstanceUID = study[0].StudyInstanceUID
    result = TriageResult(study[0].StudyInstanceUID, "stat",
                          (Finding("trauma_subdural_hematoma", 0.9, 0.5, (region(outside, 1, 1, 0.5),)),))
    expected = f"region 0 of finding 'trauma_subdural_hematoma' is on image {outside.SOPInstanceUID}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        build_sr(result, study, device_uid=DEVICE_UID)


def test_an_open_polygon_is_refused(study):
    open_polygon = ImageRegion(study[0].SOPInstanceUID, study[0].SOPClassUID, study[0].SeriesInstanceUID,
                               ((1.0, 1.0), (5.0, 1.0), (5.0, 5.0), (1.0, 5.0)), 0.3)
    result = TriageResult(study[0].StudyInstanceUID, "stat",
                          (Finding("trauma_subdural_hematoma", 0.9, 0.5, (open_polygon,)),))
    with pytest.raises(ValueError, match="not closed"):
        build_sr(result, study, device_uid=DEVICE_UID)


def test_an_unknown_label_or_referral_is_refused_by_name(study):
    unknown_label = TriageResult(study[0].StudyInstanceUID, "stat", (Finding("tumor_martian", 0.9, 0.5),))
    with pytest.raises(ValueError, match="'tumor_martian'"):
        build_sr(unknown_label, study, device_uid=DEVICE_UID)
    unknown_referral = TriageResult(study[0].StudyInstanceUID, "stat", (), referrals=("astrology",))
    with pytest.raises(ValueError, match="'astrology'"):
        build_sr(unknown_referral, study, device_uid=DEVICE_UID)


def test_empty_evidence_is_refused(study):
    with pytest.raises(ValueError, match="no evidence"):
        build_sr(infarct(study), [], device_uid=DEVICE_UID)


def test_read_sr_refuses_an_image_naming_it(study):
    with pytest.raises(ValueError, match=re.escape(study[0].SOPInstanceUID)):
        read_sr(study[0])


# --- loop prevention ----------------------------------------------------------------------------------------

def test_is_our_sr_recognises_our_sr_and_nothing_else(written, study):
    assert is_our_sr(pydicom.dcmread(written["infarct"][1], stop_before_pixels=True))
    assert not is_our_sr(study[0])
    foreign = pydicom.Dataset()
    foreign.Modality, foreign.Manufacturer, foreign.SeriesNumber = "SR", "Other Vendor", 1
    assert not is_our_sr(foreign)


def test_is_our_sr_recognises_our_device_uid_whatever_the_header_says(written):
    ours = pydicom.dcmread(written["infarct"][1])
    ours.Manufacturer, ours.SeriesNumber = "Rewritten By PACS", 5
    del ours.CodingSchemeIdentificationSequence
    assert not is_our_sr(ours)
    assert is_our_sr(ours, device_uids={DEVICE_UID})


# --- code table ---------------------------------------------------------------------------------------------

def test_code_table_covers_all_52_prima_labels_in_class_order():
    assert codes.LABELS == PRIMA_LABELS and len(codes.LABELS) == 52


def test_code_table_matches_the_model_label_table():
    labels = pytest.importorskip("models.labels")
    assert codes.LABELS == tuple(labels.DIAGNOSIS_NAMES)
    assert set(labels.REFERRALS) <= set(codes.REFERRAL_CODES)


@pytest.mark.parametrize("label", PRIMA_LABELS)
def test_every_label_has_a_short_code_that_maps_back(label):
    code = codes.code_for_label(label)
    assert len(code.value) <= 16 and len(code.meaning) <= 64
    assert code.scheme_designator in {"SCT", codes.PRIVATE_SCHEME}
    if code.scheme_designator == codes.PRIVATE_SCHEME:
        assert code.meaning == label
    assert codes.label_for_code(code) == label


def test_labels_with_a_snomed_code_in_the_spec_use_it():
    assert codes.code_for_label("trauma_subdural_hematoma").value == "35486000"
    assert codes.code_for_label("vascular_hemorrhagic_subarachnoid_hemorrahage").value == "21454007"
    assert codes.code_for_label("ventricular_ventriculomegaly").value == "413808003"
    assert codes.code_for_label("structural_edema").value == "2032001"


def test_referral_and_priority_codes_map_both_ways():
    for name in ("neurosurgery", "neurology", "stroke", "oncology"):
        assert codes.referral_for_code(codes.code_for_referral(name)) == name
    assert codes.code_for_referral("oncology").value == "309902002"
    assert {p: codes.code_for_priority(p).value for p in ("routine", "urgent", "stat")} == {
        "routine": "50811001", "urgent": "103391001", "stat": "49499008"}
    for priority in ("routine", "urgent", "stat"):
        assert codes.priority_for_code(codes.code_for_priority(priority)) == priority


def test_an_unknown_code_is_refused_by_value():
    with pytest.raises(ValueError, match="12345"):
        codes.label_for_code(Code("12345", "SCT", "Something"))
