"""Synthetic brain-MRI phantom studies (train.phantoms): reproducible, valid DICOM, correct geometry, and
lesions visible where the truth says they were planted.

Lesion checks read the written DICOM files back and locate the truth's RAS point through each series' own
ImagePositionPatient / ImageOrientationPatient, so they also prove the geometry in the headers is right.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from tests.support.phantoms import all_series_study  # noqa: F401 (the fixture)
from train.phantoms import LESION_LABELS, LESIONS, SERIES, PhantomStudy, main, write_phantom_study

SEED = 0
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("phantoms")


@pytest.fixture(scope="module")
def studies(out_dir: Path) -> dict[str, PhantomStudy]:
    """One fast study of every lesion, all with the same seed (so they share patient, geometry and noise)."""
    return {lesion: write_phantom_study(out_dir, lesion, SEED) for lesion in LESIONS}


# --- reading the files back ---------------------------------------------------------------------------------


@dataclass
class Stack:
    """The images of one series (one b-value for DWI), ordered along the slice normal."""

    pixels: np.ndarray  # (slices, rows, columns)
    positions: np.ndarray  # (slices, 3) ImagePositionPatient
    row: np.ndarray
    column: np.ndarray
    pixel_mm: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.column)

    def mean_near(self, ras_mm: tuple[float, float, float] | np.ndarray, radius_mm: float) -> float:
        """Mean pixel value over pixel centres within ``radius_mm`` of a RAS point."""
        point = np.asarray(ras_mm, dtype=float) * [-1.0, -1.0, 1.0]  # RAS -> LPS
        offset = point - self.positions  # (slices, 3)
        along = offset @ self.normal
        i = np.arange(self.pixels.shape[1]) * self.pixel_mm
        j = np.arange(self.pixels.shape[2]) * self.pixel_mm
        distance2 = (
            along[:, None, None] ** 2
            + (i[None, :, None] - (offset @ self.column)[:, None, None]) ** 2
            + (j[None, None, :] - (offset @ self.row)[:, None, None]) ** 2
        )
        inside = distance2 <= radius_mm**2
        assert inside.any(), f"no pixel within {radius_mm} mm of {ras_mm}: the point is outside the series"
        return float(self.pixels[inside].mean())


def read_series(study: PhantomStudy, description: str) -> dict[float, Stack]:
    """Stacks of one series by DiffusionBValue (0 for non-diffusion series), sorted along the normal."""
    uid = next(uid for uid, name in study.series.items() if name == description)
    datasets = [pydicom.dcmread(path) for path in (study.folder / uid).glob("*.dcm")]
    by_b: dict[float, list[pydicom.Dataset]] = {}
    for ds in datasets:
        by_b.setdefault(float(ds.get("DiffusionBValue", 0.0)), []).append(ds)
    stacks = {}
    for b_value, group in by_b.items():
        orientation = np.array(group[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        group.sort(key=lambda ds: float(np.array(ds.ImagePositionPatient, dtype=float) @ normal))
        stacks[b_value] = Stack(
            pixels=np.stack([ds.pixel_array.astype(np.float64) for ds in group]),
            positions=np.array([ds.ImagePositionPatient for ds in group], dtype=float),
            row=orientation[:3],
            column=orientation[3:],
            pixel_mm=float(group[0].PixelSpacing[0]),
        )
    return stacks


def mirrored(ras_mm: tuple[float, float, float]) -> tuple[float, float, float]:
    """The same point in the other hemisphere."""
    return (-ras_mm[0], ras_mm[1], ras_mm[2])


def asymmetry(stack: Stack, ras_mm: tuple[float, float, float], radius_mm: float) -> float:
    """Signal near a point over signal at its mirror image. Each series is scaled to its own 99th percentile,
    as a scanner's receiver would, so a bright lesion darkens the rest of its study: compare within a
    study."""
    return stack.mean_near(ras_mm, radius_mm) / stack.mean_near(mirrored(ras_mm), radius_mm)


# --- reproducibility ----------------------------------------------------------------------------------------


def test_same_seed_writes_byte_identical_files(studies: dict[str, PhantomStudy], tmp_path: Path) -> None:
    first = studies["tumour"]
    again = write_phantom_study(tmp_path, "tumour", SEED)

    assert again.study_instance_uid == first.study_instance_uid
    assert again.series == first.series
    assert again.truth == first.truth
    relative = [p.relative_to(again.folder) for p in again.files]
    assert relative == [p.relative_to(first.folder) for p in first.files]
    for mine, theirs in zip(again.files, first.files, strict=True):
        assert mine.read_bytes() == theirs.read_bytes(), f"{mine.name} differs between two runs of one seed"


def test_another_seed_or_lesion_gives_new_uids_and_pixels(
    studies: dict[str, PhantomStudy], tmp_path: Path
) -> None:
    other_seed = write_phantom_study(tmp_path, "tumour", SEED + 1)
    first = studies["tumour"]

    assert other_seed.study_instance_uid != first.study_instance_uid
    assert not set(other_seed.series) & set(first.series)
    assert not _sop_uids(other_seed) & _sop_uids(first)
    flair_a = read_series(first, "AX T2 FLAIR")[0.0].pixels
    flair_b = read_series(other_seed, "AX T2 FLAIR")[0.0].pixels
    assert not np.array_equal(flair_a, flair_b)
    assert other_seed.truth.centre_ras_mm != first.truth.centre_ras_mm  # position jitter

    all_study_uids = {study.study_instance_uid for study in studies.values()}
    assert len(all_study_uids) == len(LESIONS), "two lesions with one seed share a StudyInstanceUID"


def _sop_uids(study: PhantomStudy) -> set[str]:
    return {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in study.files}


# --- DICOM content ------------------------------------------------------------------------------------------


def test_every_file_is_a_12_bit_mr_image_of_one_study(studies: dict[str, PhantomStudy]) -> None:
    study = studies["infarct"]
    datasets = [pydicom.dcmread(path) for path in study.files]

    assert len(datasets) == 24 + 48 + 24  # FLAIR, DWI b0 + b1000, ADC
    assert sorted(study.series.values()) == ["AX DWI", "AX DWI ADC", "AX T2 FLAIR"]
    for path, ds in zip(study.files, datasets, strict=True):
        assert path.parent == study.folder / ds.SeriesInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "MR"
        assert ds.StudyInstanceUID == study.study_instance_uid
        assert study.series[ds.SeriesInstanceUID] == ds.SeriesDescription
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID):
            assert len(uid) <= 64 and UID_PATTERN.match(uid), uid
        assert ds.BitsStored == 12 and ds.BitsAllocated == 16
        assert int(ds.pixel_array.max()) <= 4095
        width = float(ds.WindowWidth)
        assert width > 0 and float(ds.WindowCenter) == pytest.approx(width / 2)
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1

    ds = datasets[0]
    assert ds.BodyPartExamined == "BRAIN"
    assert ds.StudyDescription == "MRI BRAIN WO CONTRAST"
    assert ds.Manufacturer == "TriagePhantom"
    assert ds.PatientName == f"PHANTOM^{SEED}"
    assert ds.PatientSex in ("F", "M")
    assert re.fullmatch(r"\d{3}Y", ds.PatientAge)
    for keyword in ("PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                    "ReferringPhysicianName", "InstitutionName", "SeriesNumber", "InstanceNumber"):
        assert str(ds.get(keyword, "")).strip(), f"{keyword} is empty"


def test_diffusion_images_carry_b_values_and_adc_is_derived(studies: dict[str, PhantomStudy]) -> None:
    study = studies["normal"]
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for path in study.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesDescription, []).append(ds)

    b_values = sorted(float(ds.DiffusionBValue) for ds in by_series["AX DWI"])
    assert b_values == [0.0] * 24 + [1000.0] * 24
    assert all(list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "DIFFUSION"] for ds in by_series["AX DWI"])
    assert all(list(ds.ImageType) == ["DERIVED", "PRIMARY", "ADC"] for ds in by_series["AX DWI ADC"])
    assert all(ds.ImageType[0] == "ORIGINAL" for ds in by_series["AX T2 FLAIR"])


def test_consecutive_slices_step_along_the_normal_by_spacing_between_slices(
    all_series_study: PhantomStudy,
) -> None:
    assert sorted(all_series_study.series.values()) == sorted(SERIES)
    for uid, description in all_series_study.series.items():
        folder = all_series_study.folder / uid
        datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")]
        datasets.sort(key=lambda ds: int(ds.InstanceNumber))
        assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, len(datasets) + 1))
        orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
        row, column = orientation[:3], orientation[3:]
        assert np.linalg.norm(row) == pytest.approx(1, abs=1e-5)
        assert np.linalg.norm(column) == pytest.approx(1, abs=1e-5)
        assert row @ column == pytest.approx(0, abs=1e-5)
        normal = np.cross(row, column)
        spacing = float(datasets[0].SpacingBetweenSlices)
        # Instances run through the slices once per contrast (DWI: b0 then b1000).
        contrasts = 2 if description == "AX DWI" else 1
        slices = len(datasets) // contrasts
        for start in range(0, len(datasets), slices):
            group = datasets[start:start + slices]
            positions = np.array([ds.ImagePositionPatient for ds in group], dtype=float)
            steps = np.diff(positions, axis=0)
            np.testing.assert_allclose(steps, np.tile(spacing * normal, (len(steps), 1)), atol=2e-3,
                                       err_msg=description)
            locations = [float(ds.SliceLocation) for ds in group]
            np.testing.assert_allclose(locations, positions @ normal, atol=2e-3, err_msg=description)
        assert all(np.allclose(np.array(ds.ImageOrientationPatient, dtype=float), orientation, atol=1e-6)
                   for ds in datasets)


def test_dwi_slices_of_both_b_values_share_positions(studies: dict[str, PhantomStudy]) -> None:
    stacks = read_series(studies["normal"], "AX DWI")
    np.testing.assert_allclose(stacks[0.0].positions, stacks[1000.0].positions)


# --- what was planted is what is seen -----------------------------------------------------------------------


def test_truth_names_the_lesion_its_labels_and_its_side(studies: dict[str, PhantomStudy]) -> None:
    for lesion, study in studies.items():
        truth = study.truth
        assert truth.lesion == lesion
        assert truth.labels == LESION_LABELS[lesion]
        if lesion == "normal":
            assert (truth.side, truth.centre_ras_mm, truth.volume_ml) == (None, None, 0.0)
            continue
        assert truth.centre_ras_mm is not None and truth.volume_ml > 2.0
        if lesion == "hydrocephalus":
            assert truth.side is None
        else:
            # RAS +x is the patient's right.
            assert truth.side == ("right" if truth.centre_ras_mm[0] > 0 else "left")


def test_tumour_is_bright_on_flair_against_the_other_hemisphere(studies: dict[str, PhantomStudy]) -> None:
    centre = studies["tumour"].truth.centre_ras_mm
    assert centre is not None
    tumour = read_series(studies["tumour"], "AX T2 FLAIR")[0.0]
    normal = read_series(studies["normal"], "AX T2 FLAIR")[0.0]

    # Against the same patient without the tumour (same slices, bias and noise): the brain is not perfectly
    # symmetric, so the tumour must add its contrast on top of whatever asymmetry the normal study has there.
    assert asymmetry(tumour, centre, 6.0) > 1.25 * asymmetry(normal, centre, 6.0)


def test_infarct_is_bright_on_b1000_and_dark_on_adc(studies: dict[str, PhantomStudy]) -> None:
    study = studies["infarct"]
    centre = study.truth.centre_ras_mm
    assert centre is not None
    b1000 = read_series(study, "AX DWI")[1000.0]
    adc = read_series(study, "AX DWI ADC")[0.0]

    assert asymmetry(b1000, centre, 5.0) > 1.5
    assert asymmetry(adc, centre, 5.0) < 0.7
    assert 250 < adc.mean_near(centre, 4.0) < 550  # ≈ 0.35·10⁻³ mm²/s, stored ×10⁶


def test_subdural_crescent_is_bright_on_flair_over_one_convexity(studies: dict[str, PhantomStudy]) -> None:
    study = studies["subdural_haemorrhage"]
    centre = study.truth.centre_ras_mm
    assert centre is not None and abs(centre[0]) > 40, "the crescent lies over the lateral convexity"
    flair = read_series(study, "AX T2 FLAIR")[0.0]
    normal = read_series(studies["normal"], "AX T2 FLAIR")[0.0]

    assert asymmetry(flair, centre, 4.0) > 2.0 * asymmetry(normal, centre, 4.0)
    # A band, not a blob: 25 mm above and below its thickest point it is still there.
    for dz in (-25.0, 25.0):
        point = (centre[0], centre[1], centre[2] + dz)
        assert _brightest_outward(flair, point) > 1.3 * _brightest_outward(flair, mirrored(point)), (
            f"no band {dz:+} mm from the centre")


def _brightest_outward(stack: Stack, ras: tuple[float, float, float]) -> float:
    """Brightest 4 mm mean along a line from 30 to 70 mm off the midline, on the point's side, at its height
    (the band follows the skull, so its distance from the midline changes with height)."""
    sign = 1.0 if ras[0] > 0 else -1.0
    return max(stack.mean_near((sign * x, ras[1], ras[2]), 4.0) for x in np.arange(30.0, 70.0, 2.0))


def test_hydrocephalus_enlarges_the_ventricles(studies: dict[str, PhantomStudy]) -> None:
    centre = studies["hydrocephalus"].truth.centre_ras_mm
    assert centre is not None

    def csf_pixels(study: PhantomStudy) -> int:
        # ADC > 2.0·10⁻³ mm²/s is free water; count it in the slices through the ventricles only.
        adc = read_series(study, "AX DWI ADC")[0.0]
        heights = (adc.positions @ adc.normal) - (np.asarray(centre) * [-1, -1, 1]) @ adc.normal
        return int((adc.pixels[np.abs(heights) < 20.0] > 2000).sum())

    assert csf_pixels(studies["hydrocephalus"]) > 1.5 * csf_pixels(studies["normal"])


def test_normal_and_lesion_studies_of_one_seed_differ_only_around_the_lesion(
    studies: dict[str, PhantomStudy],
) -> None:
    """Same seed = same patient, slices and noise: a lesion study is its normal study plus the lesion."""
    normal = read_series(studies["normal"], "AX DWI ADC")[0.0]
    infarct = read_series(studies["infarct"], "AX DWI ADC")[0.0]
    np.testing.assert_array_equal(normal.positions, infarct.positions)
    changed = np.argwhere(normal.pixels != infarct.pixels)
    assert changed.size, "the infarct changed nothing"
    # Every changed pixel lies within a few centimetres of the infarct.
    centre = np.asarray(studies["infarct"].truth.centre_ras_mm) * [-1, -1, 1]
    lps = (infarct.positions[changed[:, 0]] + changed[:, 1:2] * infarct.pixel_mm * infarct.column
           + changed[:, 2:3] * infarct.pixel_mm * infarct.row)
    assert np.linalg.norm(lps - centre, axis=1).max() < 40.0


# --- options ------------------------------------------------------------------------------------------------


def test_a_series_subset_is_the_same_series_as_in_the_whole_study(
    studies: dict[str, PhantomStudy], tmp_path: Path
) -> None:
    only_flair = write_phantom_study(tmp_path, "tumour", SEED, series=["AX T2 FLAIR"])
    whole = studies["tumour"]

    assert list(only_flair.series.values()) == ["AX T2 FLAIR"]
    assert only_flair.study_instance_uid == whole.study_instance_uid
    (uid,) = only_flair.series
    whole_flair = sorted(p for p in whole.files if p.parent.name == uid)
    assert [p.read_bytes() for p in sorted(only_flair.files)] == [p.read_bytes() for p in whole_flair]


def test_unknown_lesion_or_series_is_rejected_with_the_valid_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="glioblastoma.*tumour"):
        write_phantom_study(tmp_path, "glioblastoma")
    with pytest.raises(ValueError, match="AX SWI.*AX T2 FLAIR"):
        write_phantom_study(tmp_path, "normal", series=["AX SWI"])
    with pytest.raises(ValueError, match="seed"):
        write_phantom_study(tmp_path, "normal", seed=-1)
    assert not any(tmp_path.iterdir()), "a rejected call wrote files"


def test_shuffled_file_names_say_nothing_about_slice_order(
    studies: dict[str, PhantomStudy], tmp_path: Path
) -> None:
    shuffled = write_phantom_study(tmp_path, "normal", SEED, series=["AX DWI ADC"], shuffle_names=True)

    by_name = sorted(shuffled.files, key=lambda p: p.name)
    instances = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in by_name]
    assert sorted(instances) == list(range(1, 25))
    assert instances != sorted(instances)
    (uid,) = shuffled.series
    plain = {p for p in studies["normal"].files if p.parent.name == uid}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in shuffled.files} == {
        pydicom.dcmread(p).SOPInstanceUID for p in plain
    }


def test_one_patient_keeps_identity_across_studies_and_patients_vary(tmp_path: Path) -> None:
    def header(study: PhantomStudy) -> pydicom.Dataset:
        return pydicom.dcmread(study.files[0], stop_before_pixels=True)

    prior = header(write_phantom_study(tmp_path, "normal", 11, series=["AX DWI ADC"], patient_index=7))
    current = header(write_phantom_study(tmp_path, "tumour", 12, series=["AX DWI ADC"], patient_index=7))
    assert (prior.PatientName, prior.PatientID, prior.PatientSex, prior.PatientBirthDate) == (
        current.PatientName, current.PatientID, current.PatientSex, current.PatientBirthDate)
    assert prior.StudyInstanceUID != current.StudyInstanceUID
    assert prior.PatientName == "PHANTOM^7"

    others = [header(write_phantom_study(tmp_path, "normal", seed, series=["AX DWI ADC"]))
              for seed in range(20, 28)]
    assert {ds.PatientSex for ds in others} == {"F", "M"}
    assert len({ds.PatientAge for ds in others}) > 3


def test_command_line_writes_count_studies_and_reports_each(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    status = main([str(tmp_path), "--lesion", "infarct", "--seed", "5", "--count", "2",
                   "--series", "AX DWI ADC"])

    assert status == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seed"] for r in reports] == [5, 6]
    for report in reports:
        assert report["lesion"] == "infarct"
        assert report["labels"] == list(LESION_LABELS["infarct"])
        assert report["files"] == 24
        assert len(list(Path(report["folder"]).rglob("*.dcm"))) == 24


@pytest.mark.slow
def test_full_mode_writes_clinical_matrices_on_the_1mm_template(tmp_path: Path) -> None:
    study = write_phantom_study(tmp_path, "tumour", SEED, fast=False,
                                series=["AX T2 FLAIR", "SAG T1 3D MPRAGE"])
    centre = study.truth.centre_ras_mm
    assert centre is not None

    flair = read_series(study, "AX T2 FLAIR")[0.0]
    assert flair.pixels.shape == (24, 256, 256)
    assert asymmetry(flair, centre, 6.0) > 1.25
    t1 = read_series(study, "SAG T1 3D MPRAGE")[0.0]
    assert t1.pixels.shape == (176, 256, 256) and t1.pixel_mm == 1.0
    assert asymmetry(t1, centre, 6.0) < 0.8  # the tumour core is dark on T1
