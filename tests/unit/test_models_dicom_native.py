"""The native reader of uncompressed files (models.dicom_native) gives pydicom's values, pixels, volumes."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

import models.volume
from models.dicom_frames import VOLUME_KEYWORDS, decode_frames, frame_headers, read_dataset
from models.dicom_native import NativeImage, NotNative, read_native
from models.volume import load_study

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
#: Uncompressed single-frame MR and CT files among pydicom's test files: the native reader must take these.
NATIVE_TEST_FILES = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm", "CT_small.dcm"]


def _test_file(name: str) -> Path:
    path = PYDICOM_TEST_FILES / name
    if not path.exists():
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


def _series_view(ds: object) -> dict[str, object]:
    """What models.volume reads of a dataset besides its frame headers, converted as it converts them."""
    return {
        "series": str(ds.get("SeriesInstanceUID", "")),  # type: ignore[attr-defined]
        "modality": str(ds.get("Modality", "")),  # type: ignore[attr-defined]
        "sop_class": str(ds.get("SOPClassUID", "")),  # type: ignore[attr-defined]
        "samples": int(ds.get("SamplesPerPixel", 1) or 1),  # type: ignore[attr-defined]
        "description": str(ds.get("SeriesDescription", "") or ""),  # type: ignore[attr-defined]
        "protocol": str(ds.get("ProtocolName", "") or ""),  # type: ignore[attr-defined]
        "has_pixels": [
            k in ds  # type: ignore[operator]
            for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
        ],
    }


def _read_as_volume_reads(path: Path, native: bool) -> tuple[object, dict[str, object], list]:
    ds = read_dataset(path, native=native)
    return ds, _series_view(ds), frame_headers(ds, path)


def _assert_same_as_pydicom(path: Path) -> NativeImage | None:
    """Native and pydicom reading of ``path`` agree on everything a volume uses; returns the native image."""
    try:
        expected, expected_view, expected_headers = _read_as_volume_reads(path, native=False)
    except Exception as error:  # noqa: BLE001 - whatever pydicom raises, the native path must raise too
        with pytest.raises(type(error)):
            _read_as_volume_reads(path, native=True)
        return None
    actual, view, headers = _read_as_volume_reads(path, native=True)
    assert view == expected_view
    assert headers == expected_headers
    if isinstance(actual, NativeImage) and "PixelData" in actual:
        expected_pixels = decode_frames(expected)
        pixels = decode_frames(actual)
        assert pixels.dtype == expected_pixels.dtype
        assert np.array_equal(pixels, expected_pixels)
    return actual if isinstance(actual, NativeImage) else None


@pytest.mark.parametrize("name", NATIVE_TEST_FILES)
def test_uncompressed_mr_and_ct_test_files_are_read_natively_with_pydicoms_values_and_pixels(
    name: str,
) -> None:
    path = _test_file(name)
    assert isinstance(read_native(path), NativeImage)
    assert _assert_same_as_pydicom(path) is not None


def test_every_pydicom_test_file_reads_as_pydicom_reads_it_natively_or_by_falling_back() -> None:
    paths = sorted(PYDICOM_TEST_FILES.glob("*.dcm"))
    if not paths:
        pytest.skip("pydicom's test files are not installed")
    native = [path.name for path in paths if _assert_same_as_pydicom(path) is not None]
    assert set(NATIVE_TEST_FILES) <= set(native)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "emri_small.dcm",
        "liver_1frame.dcm",
        "SC_rgb_small_odd.dcm",
        "no_meta.dcm",
    ],
)
def test_compressed_big_endian_multiframe_colour_or_metaless_files_are_left_to_pydicom(name: str) -> None:
    with pytest.raises(NotNative):
        read_native(_test_file(name))


def test_unused_high_bits_are_cleared_and_signed_values_sign_extended_as_pydicom_does(tmp_path: Path) -> None:
    for representation, stored in ((0, [0x0FFF, 0xF123, 0x1000, 7]), (1, [0x07FF, 0x0800, 0xF800, 0xFFFF])):
        ds = pydicom.dcmread(_test_file("MR_small.dcm"))
        ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 2, 2, 12, 11, representation
        ds.PixelData = np.array(stored, dtype="<u2").tobytes()  # high bits set where Bits Stored ends
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        path = tmp_path / f"bits{representation}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert _assert_same_as_pydicom(path) is not None


def test_non_ascii_text_and_several_values_where_one_is_expected_fall_back_to_pydicom(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_test_file("MR_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SeriesDescription = "Schädel T2"
    ds.save_as(tmp_path / "latin1.dcm", enforce_file_format=True)
    ds.SeriesDescription = "A\\B"
    ds.save_as(tmp_path / "two.dcm", enforce_file_format=True)
    for name in ("latin1.dcm", "two.dcm"):
        with pytest.raises(NotNative):
            read_native(tmp_path / name)
        assert _assert_same_as_pydicom(tmp_path / name) is None


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    from train.phantoms import write_phantom_study

    study = write_phantom_study(tmp_path_factory.mktemp("native"), lesion="infarct", seed=5)
    return {series.name: sorted(series.glob("*.dcm")) for series in sorted(study.folder.iterdir())}


def test_phantom_study_volumes_are_bit_identical_to_the_pydicom_path(
    phantom_study: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for paths in phantom_study.values():
        assert all(isinstance(read_dataset(path), NativeImage) for path in paths)
    native_volumes, native_skipped = load_study(phantom_study)
    monkeypatch.setattr(models.volume, "read_dataset", functools.partial(read_dataset, native=False))
    pydicom_volumes, pydicom_skipped = load_study(phantom_study)

    assert native_skipped == pydicom_skipped == {}
    assert [v.volume_id for v in native_volumes] == [v.volume_id for v in pydicom_volumes]
    for native, reference in zip(native_volumes, pydicom_volumes):
        assert native.array.dtype == reference.array.dtype
        assert np.array_equal(native.array, reference.array)
        assert np.array_equal(native.affine_lps, reference.affine_lps)
        assert (native.name, native.thin_axis, native.source, native.notes) == (
            reference.name,
            reference.thin_axis,
            reference.source,
            reference.notes,
        )


def test_volume_keywords_cover_every_element_the_native_reader_reads() -> None:
    from models.dicom_native import _WANTED

    assert {keyword for keyword, _ in _WANTED.values()} <= set(VOLUME_KEYWORDS)
