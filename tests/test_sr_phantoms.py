"""Acceptance 1 of the results issue with phantom evidence: for a phantom study of each lesion type, the SR
built on its real DICOM headers passes dciodvfy with no errors, dsrdump prints it, PixelMed's DicomSRValidator
reports no errors, and it reads back into an equal result. (test_sr.py covers the same on synthetic headers,
in depth.)
"""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from pacs_bridge.results import Finding, ImageRegion, SimilarStudy, TriageResult
from pacs_bridge.sr import build_sr, read_sr
from tests.test_sr import DEVICE_UID, dciodvfy_errors, dsrdump, pixelmed_report

#: What a good model would say about each phantom: priority and referral by lesion (a clinical configuration).
EXPECTED = {
    "normal": ("routine", ()),
    "subdural_haemorrhage": ("stat", ("neurosurgery",)),
    "tumour": ("urgent", ("oncology", "neurosurgery")),
    "infarct": ("stat", ("stroke",)),
    "hydrocephalus": ("urgent", ("neurosurgery",)),
}


def phantom_result(lesion: str, headers: list[pydicom.Dataset], truth_labels: tuple[str, ...],
                   prior_uid: str) -> TriageResult:
    priority, referrals = EXPECTED[lesion]
    middle = headers[len(headers) // 2]
    column, row = float(middle.Columns) / 2, float(middle.Rows) / 2
    square = ((column, row), (column + 8, row), (column + 8, row + 8), (column, row + 8), (column, row))
    region = ImageRegion(middle.SOPInstanceUID, middle.SOPClassUID, middle.SeriesInstanceUID, square, 0.4375)
    findings = tuple(Finding(label, 0.93 - 0.1 * i, 0.4, regions=(region,) if i == 0 else ())
                     for i, label in enumerate(truth_labels))
    if not findings:  # a normal study: nothing above threshold, the top of the differential all the same
        findings = (Finding("structural_cerebral_atrophy", 0.08, 0.5),)
    return TriageResult(study_instance_uid=middle.StudyInstanceUID, priority=priority, findings=findings,
                        referrals=tuple(sorted(referrals)), model_version="1.0.7+tiny",
                        priority_scores={"none": 0.1, "low": 0.3, "high": 0.6},
                        similar_studies=(SimilarStudy(prior_uid, 0.8125, truth_labels),)
                        if truth_labels else ())


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[TriageResult, Path]]:
    from train.phantoms import LESIONS, write_phantom_study
    from train.phantoms.acquisition import FAST_SERIES

    folder = tmp_path_factory.mktemp("phantom-sr")
    out = {}
    for lesion in LESIONS:
        # One series keeps this cheap; the SR references every image of it.
        study = write_phantom_study(folder / lesion, lesion=lesion, seed=21, series=[FAST_SERIES[0]])
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.files]
        result = phantom_result(lesion, headers, study.truth.labels, prior_uid=f"2.25.{1000 + len(out)}")
        path = folder / f"{lesion}.sr.dcm"
        build_sr(result, headers, device_uid=DEVICE_UID).save_as(path, enforce_file_format=True)
        out[lesion] = (result, path)
    return out


LESION_NAMES = tuple(EXPECTED)


@pytest.mark.parametrize("lesion", LESION_NAMES)
def test_the_sr_of_each_phantom_passes_dciodvfy_and_dsrdump_and_reads_back_equal(written, lesion):
    result, path = written[lesion]
    assert dciodvfy_errors(path) == []
    run = dsrdump(path)
    assert run.returncode == 0 and "Imaging Measurement Report" in run.stdout, run.stderr
    assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("E:")] == []
    assert read_sr(pydicom.dcmread(path)) == result


@pytest.mark.slow
def test_pixelmed_finds_no_error_in_the_sr_of_any_phantom(written):
    from concurrent.futures import ThreadPoolExecutor

    # One JVM per file, side by side: the validator takes tens of seconds per SR.
    with ThreadPoolExecutor(max_workers=len(written)) as pool:
        reports = dict(zip(written, pool.map(pixelmed_report, (path for _, path in written.values()))))
    for lesion, report in reports.items():
        assert "Found Root Template TID_1500 (MeasurementReport)" in report, (lesion, report)
        assert [line for line in report.splitlines() if line.startswith("Error")] == [], lesion


def test_every_lesion_type_is_covered():
    from train.phantoms import LESIONS

    assert set(LESIONS) == set(EXPECTED)
