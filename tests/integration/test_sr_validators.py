"""The triage SR passes the outside validators: dciodvfy (dicom3tools), dsrdump (dcmtk) and PixelMed."""
from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_bridge.sr import build_sr, read_sr
from tests.support.sr_cases import CASES, infarct, study, written  # noqa: F401 (fixtures)
from tests.support.sr_checks import DEVICE_UID, dciodvfy_errors, dsrdump, pixelmed_report


@pytest.mark.needs_dcmtk
@pytest.mark.parametrize("case", CASES)
def test_dciodvfy_reports_no_errors(written, case):
    _, path = written[case]
    assert dciodvfy_errors(path) == []


@pytest.mark.needs_dcmtk
@pytest.mark.parametrize("case", CASES)
def test_dsrdump_parses_the_content_tree_without_errors(written, case):
    _, path = written[case]
    run = dsrdump(path)
    assert run.returncode == 0, run.stderr
    assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("E:")] == []
    assert "Imaging Measurement Report" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_pixelmed_validates_iod_and_tid_1500_without_errors(written, case):
    _, path = written[case]
    report = pixelmed_report(path)
    assert "Found Root Template TID_1500 (MeasurementReport)" in report, report
    assert "IOD validation complete" in report, report
    assert [line for line in report.splitlines() if line.startswith("Error")] == []
    # PixelMed's 2022 TID 1501 lacks the qualitative-evaluation rows of PS3.16 (highdicom writes them): it warns
    # "not in template" for a finding's Presence and a similar study's confirmed findings, and for nothing else.
    warnings = [line for line in report.splitlines() if line.startswith("Warning")]
    assert all("Content Item not in template" in w and ("(705057003,SCT,\"Presence\")" in w or "CONFIRMED-DX" in w)
               for w in warnings), warnings


@pytest.mark.needs_dcmtk
def test_a_revised_sr_references_its_predecessor_in_the_same_series(study, tmp_path):
    first = build_sr(infarct(study), study, device_uid=DEVICE_UID)
    late = copy.deepcopy(study[0])
    late.SOPInstanceUID, late.InstanceNumber = generate_uid(), 151
    revised_result = infarct([*study, late])
    revised = build_sr(revised_result, [*study, late], device_uid=DEVICE_UID, previous_sr=first,
                       instance_number=2)

    [predecessor] = revised.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == first.StudyInstanceUID
    [series] = predecessor.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID == revised.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert revised.SOPInstanceUID != first.SOPInstanceUID
    path = tmp_path / "revised.dcm"
    revised.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert read_sr(pydicom.dcmread(path)) == revised_result
