"""Series -> volume: geometry, slice order, orientation, skipping with reasons (models.volume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from models.volume import SeriesSkipped, load_series, load_series_volumes, load_study, prima_series_name
from tests.support.mr_series import AXIAL, CORONAL, SAGITTAL, oblique, write_enhanced_series, write_series


def source_pixel_of(volume, index: np.ndarray) -> tuple[int, np.ndarray]:
    """(slice number in the volume's source list, native (row, column) continuous index) of an array voxel."""
    along_thin = int(index[volume.thin_axis])
    source = volume.source[along_thin]
    column, row, distance = source.patient_to_pixel(volume.index_to_patient(index))[0]
    assert abs(distance) < 1e-6, "the affine puts the voxel off its source image's plane"
    return along_thin, np.array([row - 0.5, column - 0.5])


def assert_voxels_come_from_their_source_pixels(volume, images_by_uid: dict[str, np.ndarray]) -> None:
    """Every voxel whose source position is a whole native pixel holds that pixel's value."""
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(4000):
        index = np.array([rng.integers(0, n) for n in volume.array.shape])
        slice_number, (row, column) = source_pixel_of(volume, index)
        if not (np.isclose(row, round(row)) and np.isclose(column, round(column))):
            continue
        image = images_by_uid[volume.source[slice_number].sop_instance_uid]
        assert volume.array[tuple(index)] == image[round(row), round(column)]
        checked += 1
    assert checked > 50


def images_by_sop(paths: list[Path]) -> dict[str, np.ndarray]:
    return {str(ds.SOPInstanceUID): ds.pixel_array for ds in map(pydicom.dcmread, paths)}


def test_axial_series_is_sorted_by_position_not_file_name_and_its_affine_hits_the_dicom_positions(
    tmp_path: Path,
) -> None:
    paths, positions, _ = write_series(tmp_path, orientation=AXIAL, n_slices=7, file_order="shuffled")
    volume = load_series(paths)

    assert volume.array.shape == (7, 256, 256) and volume.array.dtype == np.float32
    assert volume.thin_axis == 0
    for k, position in enumerate(positions):  # slice k along +S is array index k
        assert np.allclose(volume.index_to_patient(np.array([k, 0, 0]))[0], position)
        assert np.allclose(volume.source[k].image_position, position)
    # 64 native pixels of 3.5 mm spread over 256 voxels: 0.875 mm per voxel along P and L.
    assert np.allclose(volume.spacing, [5.0, 0.875, 0.875])
    assert_voxels_come_from_their_source_pixels(volume, images_by_sop(paths))
    assert volume.name == "AX_T1_POST_plus_C"


@pytest.mark.parametrize(
    ("orientation", "shape", "thin_axis"),
    [
        (CORONAL, (256, 6, 256), 1),
        (SAGITTAL, (256, 256, 6), 2),
        (oblique(25), (6, 256, 256), 0),
    ],
    ids=["coronal", "sagittal", "oblique"],
)
def test_each_orientation_lands_in_lps_array_order_with_voxels_from_the_right_pixels(
    tmp_path: Path, orientation, shape, thin_axis
) -> None:
    paths, positions, _ = write_series(tmp_path, orientation=orientation, n_slices=6, rows=64, columns=48)
    volume = load_series(paths)

    assert volume.array.shape == shape and volume.thin_axis == thin_axis
    # Array axes run toward S, P and L: the affine's columns point (mostly) along +S, +P, +L.
    direction = volume.affine_lps[:3, :3] / volume.spacing
    assert np.argmax(np.abs(direction[:, 0])) == 2 and direction[2, 0] > 0
    assert np.argmax(np.abs(direction[:, 1])) == 1 and direction[1, 1] > 0
    assert np.argmax(np.abs(direction[:, 2])) == 0 and direction[0, 2] > 0
    # Sources follow the array along the thin axis: their positions are in increasing array order.
    along = [np.dot(direction[:, thin_axis], s.image_position) for s in volume.source]
    assert np.all(np.diff(along) > 0)
    assert {tuple(np.round(s.image_position, 4)) for s in volume.source} == {
        tuple(np.round(p, 4)) for p in positions
    }
    assert_voxels_come_from_their_source_pixels(volume, images_by_sop(paths))


def test_in_plane_resampling_keeps_integer_values_and_zeroes_samples_past_the_last_pixel(
    tmp_path: Path,
) -> None:
    ramp = np.tile(np.arange(64, dtype=np.int16) * 10, (64, 1))  # value = 10 * column
    paths, _, _ = write_series(tmp_path, n_slices=2, pixels=lambda k: ramp)
    row = load_series(paths).array[0, 100]

    # Output column i samples native column i/4: linear in between, truncated to integers like SimpleITK.
    assert row[4] == 10 and row[5] == 12 and row[6] == 15 and row[7] == 17
    # 64 -> 256: columns 254 and 255 sample x = 63.5 and 63.75, outside ITK's [-0.5, 63.5): 0, not 2 (D4).
    assert row[253] == 630 and row[254] == 0 and row[255] == 0


def test_files_with_a_minority_matrix_size_are_dropped(tmp_path: Path) -> None:
    paths, _, _ = write_series(tmp_path / "a", n_slices=5)
    odd, _, _ = write_series(tmp_path / "b", n_slices=1, rows=32, columns=32, origin=(0, 0, 200))
    volume = load_series(paths + odd)
    assert volume.array.shape == (5, 256, 256)


def test_256_slice_series_keeps_its_slice_axis_from_geometry(tmp_path: Path) -> None:
    # Defect D2: with 256 slices no axis differs from 256, so the reference cannot find the thin axis.
    paths, _, _ = write_series(
        tmp_path,
        orientation=CORONAL,
        n_slices=256,
        rows=16,
        columns=16,
        slice_spacing=1.0,
        pixels=lambda k: np.full((16, 16), k, np.int16),
    )
    volume = load_series(paths)
    assert volume.array.shape == (256, 256, 256)
    assert volume.thin_axis == 1
    assert np.array_equal(volume.array[100, :, 100], np.arange(256))  # slice k (along +P) holds value k


def test_single_slice_series_loads_as_one_slice(tmp_path: Path) -> None:
    paths, positions, _ = write_series(tmp_path, n_slices=1, slice_spacing=3.0)
    volume = load_series(paths)
    assert volume.array.shape == (1, 256, 256)
    assert np.allclose(volume.spacing[0], 3.0)  # SliceThickness stands in for the spacing
    assert np.allclose(volume.index_to_patient(np.zeros(3))[0], positions[0])


def test_localizer_by_image_type_is_skipped_with_reason(tmp_path: Path) -> None:
    paths, _, _ = write_series(tmp_path, n_slices=3, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with pytest.raises(SeriesSkipped, match="LOCALIZER"):
        load_series(paths)


def test_three_plane_localizer_without_image_type_is_skipped_by_geometry(tmp_path: Path) -> None:
    uid = "1.2.3.4.5"
    paths = []
    for name, orientation in (("a", AXIAL), ("c", CORONAL), ("s", SAGITTAL)):
        paths += write_series(tmp_path / name, n_slices=1, orientation=orientation, series_uid=uid)[0]
    with pytest.raises(SeriesSkipped, match="localizer: 3 images in 3 orientations"):
        load_series(paths)


def test_series_with_many_images_in_two_orientations_is_skipped_as_inconsistent(tmp_path: Path) -> None:
    uid = "1.2.3.4.6"
    paths = write_series(tmp_path / "a", n_slices=8, series_uid=uid)[0]
    paths += write_series(tmp_path / "b", n_slices=8, orientation=SAGITTAL, series_uid=uid)[0]
    with pytest.raises(SeriesSkipped, match="inconsistent orientation"):
        load_series(paths)


def test_images_sharing_positions_are_skipped_as_4d(tmp_path: Path) -> None:
    uid = "1.2.3.4.7"
    paths = write_series(tmp_path / "b0", n_slices=4, series_uid=uid)[0]
    paths += write_series(tmp_path / "b1000", n_slices=4, series_uid=uid)[0]
    with pytest.raises(SeriesSkipped, match="share slice positions"):
        load_series(paths)


def test_non_mr_and_non_image_series_are_skipped_with_reason(tmp_path: Path) -> None:
    paths, _, _ = write_series(tmp_path, n_slices=2)
    ds = pydicom.dcmread(paths[0])
    ds.Modality = "CT"
    ds.save_as(paths[0])
    with pytest.raises(SeriesSkipped, match="modality CT"):
        load_series(paths[:1])

    sr = pydicom.dcmread(paths[1])
    del sr.PixelData
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.save_as(paths[1])
    with pytest.raises(SeriesSkipped, match="no pixel data: Comprehensive 3D SR"):
        load_series(paths[1:])


def test_enhanced_multiframe_mr_frames_are_sorted_by_position_and_keep_their_frame_numbers(
    tmp_path: Path,
) -> None:
    path, positions, images, stored_index = write_enhanced_series(tmp_path / "enhanced.dcm", n_frames=5)
    volume = load_series([path])

    assert volume.array.shape == (5, 256, 256)
    assert [s.frame_number for s in volume.source] == [i + 1 for i in stored_index]
    assert all(np.allclose(s.image_position, p) for s, p in zip(volume.source, positions))
    # 32 -> 256: voxel (k, 8r, 8c) is native pixel (r, c) of the k-th position.
    assert np.array_equal(volume.array[:, ::8, ::8], np.stack(images).astype(np.float32))


def test_compressed_enhanced_multiframe_mr_decodes_to_the_same_volume(tmp_path: Path) -> None:
    plain, *_ = write_enhanced_series(tmp_path / "plain.dcm", seed=3)
    rle, *_ = write_enhanced_series(tmp_path / "rle.dcm", seed=3, transfer_syntax=RLELossless)
    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(load_series([plain]).array, load_series([rle]).array)


def _pydicom_test_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_pydicom_compressed_mr_files_load_like_the_uncompressed_original(name: str) -> None:
    original = load_series([_pydicom_test_file("MR_small.dcm")])
    compressed = load_series([_pydicom_test_file(name)])
    assert compressed.array.shape == (1, 256, 256)
    assert np.array_equal(compressed.array, original.array)
    assert np.allclose(compressed.affine_lps, original.affine_lps)


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_pydicom_enhanced_mr_without_functional_groups_is_skipped_for_missing_geometry(name: str) -> None:
    # These anonymised samples had their functional groups stripped: no position or orientation survives.
    with pytest.raises(SeriesSkipped, match="lack plane geometry"):
        load_series([_pydicom_test_file(name)])


def test_a_failing_series_does_not_stop_the_study(tmp_path: Path) -> None:
    good, _, _ = write_series(tmp_path / "good", n_slices=3)
    scout, _, _ = write_series(
        tmp_path / "scout", n_slices=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    junk = tmp_path / "junk" / "not-dicom.dcm"
    junk.parent.mkdir()
    junk.write_bytes(b"hello")

    volumes, skipped = load_study({"good": good, "scout": scout, "junk": [junk], "empty": []})
    assert [v.series_instance_uid for v in volumes] == [str(pydicom.dcmread(good[0]).SeriesInstanceUID)]
    assert set(skipped) == {"scout", "junk", "empty"}
    assert (
        "LOCALIZER" in skipped["scout"] and "readable" in skipped["junk"] and skipped["empty"] == "no files"
    )


@pytest.mark.parametrize(
    ("description", "protocol", "expected"),
    [
        ("AX T1 POST+C", "BRAIN AX T1", "AX_T1_POST_plus_C-BRAIN_AX_T1-Protocol"),
        ("SAG*T2", "SAG*T2", "SAG_star_T2"),
        ("", "DWI", "DWI-Protocol"),
        ("", "", "UNK-1.2.3"),
    ],
)
def test_series_name_follows_prima_sanitising(description: str, protocol: str, expected: str) -> None:
    assert prima_series_name(description, protocol, "1.2.3") == expected


def test_dwi_series_with_b0_and_b1000_images_splits_into_one_named_volume_per_b_value(tmp_path: Path) -> None:
    uid = "1.2.3.4.8"
    stacks = {}
    for b_value, level in ((1000, 200), (0, 500)):
        stacks[b_value] = write_series(
            tmp_path / f"b{b_value}",
            n_slices=4,
            series_uid=uid,
            description="AX DWI",
            pixels=lambda k, level=level: np.full((64, 64), level + k, np.int16),
            extra={"DiffusionBValue": b_value},
        )
    paths = stacks[0][0] + stacks[1000][0]

    volumes = load_series_volumes(paths)

    assert [v.name for v in volumes] == ["AX_DWI_b0", "AX_DWI_b1000"]
    assert [v.volume_id for v in volumes] == [f"{uid}#b0", f"{uid}#b1000"]
    for volume, (b_value, level) in zip(volumes, ((0, 500), (1000, 200))):
        assert volume.series_instance_uid == uid and volume.array.shape == (4, 256, 256)
        positions = stacks[b_value][1]
        for k in range(4):  # geometry from the DICOM positions, pixels from the right b-value
            assert np.allclose(volume.index_to_patient(np.array([k, 0, 0]))[0], positions[k])
            assert volume.array[k, 128, 128] == level + k
    with pytest.raises(ValueError, match="holds 2 volumes"):
        load_series(paths)
    study, skipped = load_study({uid: paths})
    assert len(study) == 2 and not skipped


def test_multi_echo_series_splits_by_echo_number(tmp_path: Path) -> None:
    uid = "1.2.3.4.9"
    paths = []
    for echo in (2, 1):
        paths += write_series(
            tmp_path / f"e{echo}",
            n_slices=3,
            series_uid=uid,
            description="AX PD T2",
            extra={"EchoNumbers": echo},
        )[0]
    assert [v.label for v in load_series_volumes(paths)] == ["e1", "e2"]


def test_images_at_one_position_and_the_same_b_value_are_still_skipped(tmp_path: Path) -> None:
    uid = "1.2.3.4.10"
    paths = []
    for part in ("a", "b"):
        paths += write_series(tmp_path / part, n_slices=3, series_uid=uid, extra={"DiffusionBValue": 1000})[0]
    with pytest.raises(SeriesSkipped, match="share slice positions and no b-value"):
        load_series_volumes(paths)


def test_derived_adc_map_loads_and_secondary_capture_is_skipped(tmp_path: Path) -> None:
    adc, positions, _ = write_series(
        tmp_path / "adc",
        n_slices=5,
        description="AX DWI ADC",
        image_type=("DERIVED", "PRIMARY", "ADC", "ADC"),
    )
    volume = load_series(adc)
    assert volume.array.shape == (5, 256, 256) and volume.name == "AX_DWI_ADC"
    assert np.allclose(volume.index_to_patient(np.zeros(3))[0], positions[0])

    capture, _, _ = write_series(tmp_path / "sc", n_slices=2, sop_class="1.2.840.10008.5.1.4.1.1.7")
    with pytest.raises(SeriesSkipped, match="secondary capture"):
        load_series(capture)


def test_thin_slices_are_resampled_to_4_mm_only_when_asked(tmp_path: Path) -> None:
    paths, positions, _ = write_series(
        tmp_path, n_slices=9, slice_spacing=1.0, pixels=lambda k: np.full((64, 64), 10 * k, np.int16)
    )
    native = load_series(paths)
    assert native.array.shape[0] == 9  # off by default: the reference's behaviour (defect D5)

    thick = load_series(paths, min_slice_spacing_mm=4.0)
    assert thick.array.shape == (3, 256, 256)
    assert np.allclose(thick.spacing[0], 4.0)
    assert list(thick.array[:, 100, 100]) == [0, 40, 80]  # slices at 0, 4 and 8 mm
    for k, source_slice in enumerate((0, 4, 8)):
        assert np.allclose(thick.index_to_patient(np.array([k, 0, 0]))[0], positions[source_slice])
        assert np.allclose(thick.source[k].image_position, positions[source_slice])

    coarse = load_series(paths, min_slice_spacing_mm=3.0)  # 0, 3, 6 mm: no sample past the last slice
    assert list(coarse.array[:, 100, 100]) == [0, 30, 60]
