"""The SR with phantom evidence: for a phantom study of each lesion type, for a phantom study the input gate turned
away (not analysed), and for a slice_knn CT study, the SR built on real DICOM headers passes dciodvfy with no
errors, dsrdump prints it, PixelMed's DicomSRValidator reports no errors, it reads back into an equal result, and
it names no other patient's study. (test_sr.py covers the same on synthetic headers, in depth.)
"""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_bridge.results import Finding, ImageRegion, NotAnalysed, SimilarStudy, TriageResult
from pacs_bridge.sr import build_sr, read_outcome
from pacs_bridge.study_reference import study_reference
from tests.support.sr_checks import DEVICE_UID, SITE_KEY, dciodvfy_errors, dsrdump, pixelmed_report

pytestmark = pytest.mark.needs_dcmtk

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
                        # As read back: only the pseudonymous reference of the other patient's study.
                        similar_studies=(SimilarStudy("", 0.8125, truth_labels,
                                                      reference=study_reference(SITE_KEY, prior_uid)),)
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
        result = phantom_result(lesion, headers, study.truth.labels, prior_uid=PRIORS[len(out)])
        path = folder / f"{lesion}.sr.dcm"
        build_sr(result, headers, device_uid=DEVICE_UID).save_as(path, enforce_file_format=True)
        out[lesion] = (result, path)
    # One slice of a phantom's ADC series: the input gate turns it away.
    one = [pydicom.dcmread(write_phantom_study(folder / "one-slice", lesion="normal", seed=22,
                                               series=["AX DWI ADC"]).files[0], stop_before_pixels=True)]
    result = NotAnalysed(one[0].StudyInstanceUID, "",
                         ("no series is adequate for neuro_mri: the best, series 'AX DWI ADC', has 1 slice "
                          "(minimum 12) and 5 mm coverage (minimum 80 mm)",
                          "required series /(?i)flair/ is missing (series present: 'AX DWI ADC')"),
                         model_name="prima", model_version="1.0.7+tiny")
    build_sr(result, one, device_uid=DEVICE_UID).save_as(folder / "not_analysed.sr.dcm", enforce_file_format=True)
    out["not_analysed"] = (result, folder / "not_analysed.sr.dcm")
    # A slice_knn CT: kNN findings (one called, one not, one ruled out) and similar studies.
    from tests.support.slice_evidence import _ct_slice

    study_uid, series_uid = generate_uid(), generate_uid()
    ct = [_ct_slice(study_uid, series_uid, i, "nodule", 7) for i in range(4)]
    for ds in ct:  # headers as the worker reads them
        del ds.PixelData
    result = TriageResult(study_uid, "urgent", (
        Finding("tumor_adult_meningioma", 0.75, 0.5), Finding("cyst_arachnoid_cyst", 0.25, 0.5),
        Finding("trauma_subdural_hematoma", 0.0, 0.5, reported_absent=True)),
        model_name="medimageinsight-knn", model_version="random-seed0",
        similar_studies=tuple(SimilarStudy("", 0.9 - i / 8, ("tumor_adult_meningioma",),
                                           reference=study_reference(SITE_KEY, uid))
                              for i, uid in enumerate(PRIORS[:2])))
    build_sr(result, ct, device_uid=DEVICE_UID).save_as(folder / "slice_knn_ct.sr.dcm", enforce_file_format=True)
    out["slice_knn_ct"] = (result, folder / "slice_knn_ct.sr.dcm")
    return out


#: Other patients' studies, cited as similar: none of these UIDs may appear in any SR.
PRIORS = tuple(generate_uid() for _ in range(8))
LESION_NAMES = tuple(EXPECTED)
CASES = (*LESION_NAMES, "not_analysed", "slice_knn_ct")


@pytest.mark.parametrize("case", CASES)
def test_the_sr_of_each_phantom_passes_dciodvfy_and_dsrdump_and_reads_back_equal(written, case):
    result, path = written[case]
    assert dciodvfy_errors(path) == []
    run = dsrdump(path)
    assert run.returncode == 0 and "Imaging Measurement Report" in run.stdout, run.stderr
    assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("E:")] == []
    assert read_outcome(pydicom.dcmread(path)) == result
    raw = path.read_bytes()
    assert not any(uid.encode() in raw for uid in PRIORS)  # no other patient's study


def test_the_slice_knn_sr_tells_called_not_called_and_absent_apart(written):
    result, path = written["slice_knn_ct"]
    calls = {f.label: f.call for f in read_outcome(pydicom.dcmread(path)).findings}
    assert calls == {"tumor_adult_meningioma": "present", "cyst_arachnoid_cyst": "not called",
                     "trauma_subdural_hematoma": "absent"}


@pytest.mark.slow
def test_pixelmed_finds_no_error_in_the_sr_of_any_phantom(written):
    from concurrent.futures import ThreadPoolExecutor

    # One JVM per file, side by side: the validator takes tens of seconds per SR.
    with ThreadPoolExecutor(max_workers=len(written)) as pool:
        reports = dict(zip(written, pool.map(pixelmed_report, (path for _, path in written.values()))))
    for case, report in reports.items():
        assert "Found Root Template TID_1500 (MeasurementReport)" in report, (case, report)
        assert [line for line in report.splitlines() if line.startswith("Error")] == [], case


def test_every_lesion_type_is_covered():
    from train.phantoms import LESIONS

    assert set(LESIONS) == set(EXPECTED)
