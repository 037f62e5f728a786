"""DICOM -> 8-bit pictures on real files that pydicom's test-data packages ship, each checked against the DICOM
formulas computed here by hand (PS3.3 C.11.1 modality LUT, C.11.2.1.2.1 window, C.11.2.1.1 VOI LUT)."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from models.slice_input import (
    SliceInputError,
    dataset_slices,
    evenly_spaced,
    model_input,
    series_slices,
    to_uint8,
)


def _read(name: str):
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in the installed pydicom test data")
    return pydicom.dcmread(path)


def _window_by_hand(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """C.11.2.1.2.1 LINEAR, mapped straight onto 0..255."""
    low_edge = center - 0.5 - (width - 1) / 2
    high_edge = center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= low_edge, 0, np.where(x > high_edge, 255, y))
    return np.rint(y).astype(np.uint8)


def _stretch_by_hand(x: np.ndarray, low_pct: float = 1, high_pct: float = 99) -> np.ndarray:
    lo, hi = np.percentile(x, [low_pct, high_pct])
    return np.rint(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _agree(mine: np.ndarray, expected: np.ndarray) -> None:
    # Exact but for values that land on .5 after different float operation orders.
    assert mine.shape == expected.shape and mine.dtype == np.uint8
    diff = np.abs(mine.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


def test_chest_radiograph_monochrome1_is_windowed_and_inverted():
    ds = _read("RG1_UNCR.dcm")  # CR, MONOCHROME1, 15-bit, window 15000/30000
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    (picture,) = dataset_slices(ds)
    raw = ds.pixel_array.astype(np.float64)
    expected = 255 - _window_by_hand(raw, float(ds.WindowCenter), float(ds.WindowWidth))
    assert picture.transform == "window"
    _agree(picture.pixels, expected)
    # bright where the stored value is low: inverted relative to the stored values
    assert np.corrcoef(picture.pixels.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.9


def test_jpeg2000_compressed_radiograph_gives_the_same_picture_as_uncompressed():
    uncompressed = dataset_slices(_read("RG1_UNCR.dcm"))[0].pixels
    compressed = dataset_slices(_read("RG1_J2KR.dcm"))[0].pixels  # JPEG 2000 lossless
    np.testing.assert_array_equal(compressed, uncompressed)


def test_windowed_mr_and_its_compressed_copy():
    ds = _read("MR_small.dcm")  # MONOCHROME2, window 600/1600
    (picture,) = dataset_slices(ds)
    _agree(picture.pixels, _window_by_hand(ds.pixel_array.astype(np.float64), float(ds.WindowCenter),
                                           float(ds.WindowWidth)))
    np.testing.assert_array_equal(dataset_slices(_read("MR_small_jp2klossless.dcm"))[0].pixels, picture.pixels)


def test_unwindowed_ct_gets_the_rescale_then_a_percentile_stretch():
    ds = _read("CT_small.dcm")  # no window; slope 1, intercept -1024
    assert "WindowCenter" not in ds
    (picture,) = dataset_slices(ds)
    hounsfield = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert picture.transform == "percentile"
    _agree(picture.pixels, _stretch_by_hand(hounsfield))


def test_voi_lut_sequence_is_applied_as_a_table():
    ds = _read("vlut_04.dcm")
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    table = np.asarray(item.LUTData, dtype=np.float64)
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)
    expected = np.rint(np.clip(table[index] / (2 ** bits - 1), 0, 1) * 255).astype(np.uint8)
    (picture,) = dataset_slices(ds)
    assert picture.transform == "voi_lut"
    _agree(picture.pixels, expected)


def test_modality_lut_sequence_then_percentile_stretch():
    ds = _read("mlut_18.dcm")
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = (int(v) for v in item.LUTDescriptor)
    table = np.asarray(item.LUTData, dtype=np.float64)
    values = table[np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)]
    _agree(dataset_slices(ds)[0].pixels, _stretch_by_hand(values))


def test_multiframe_volume_yields_the_chosen_frames_each_stretched_on_its_own():
    ds = _read("emri_small_jpeg_2k_lossless.dcm")  # 10 frames, JPEG 2000 lossless, no window
    frames = evenly_spaced(int(ds.NumberOfFrames), 4)
    assert frames == [0, 3, 6, 9]
    slices = dataset_slices(ds, frames)
    assert [s.frame for s in slices] == frames
    for s, f in zip(slices, frames):
        _agree(s.pixels, _stretch_by_hand(ds.pixel_array[f].astype(np.float64)))


def test_rgb_and_ybr_pass_through_as_8_bit_colour():
    rgb = _read("SC_rgb.dcm")
    (picture,) = dataset_slices(rgb)
    assert picture.transform == "rgb"
    np.testing.assert_array_equal(picture.pixels, rgb.pixel_array)
    ybr = dataset_slices(_read("US1_J2KR.dcm"))[0]
    assert ybr.pixels.shape == (480, 640, 3) and ybr.transform == "rgb"


def test_colour_deeper_than_8_bits_is_refused_with_the_image_named():
    ds = _read("SC_rgb.dcm")
    with pytest.raises(SliceInputError, match=str(ds.SOPInstanceUID)):
        to_uint8(ds, ds.pixel_array.astype(np.uint16))


def test_series_of_files_is_ordered_by_position_and_subsampled(tmp_path):
    base = _read("CT_small.dcm")
    normal_z = []
    for i in range(9):
        ds = base.copy()
        ds.SOPInstanceUID = f"1.2.3.{i}"
        # written in reverse anatomical order: the subset must come back sorted by position
        ds.ImagePositionPatient = [0.0, 0.0, float(100 - 5 * i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.save_as(tmp_path / f"{i}.dcm")
        normal_z.append(100 - 5 * i)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    slices, problems = series_slices(sorted(tmp_path.iterdir()), max_slices=3)
    assert [s.sop_instance_uid for s in slices] == ["1.2.3.8", "1.2.3.4", "1.2.3.0"]
    assert list(problems) == [str(tmp_path / "junk.dcm")]


def test_evenly_spaced_keeps_both_ends_and_never_repeats():
    assert evenly_spaced(100, 5) == [0, 25, 50, 74, 99]
    assert evenly_spaced(3, 10) == [0, 1, 2]
    assert evenly_spaced(7, 1) == [3]
    assert evenly_spaced(0, 4) == []


def test_model_input_is_normalised_480_rgb():
    gray = np.full((50, 80), 255, np.uint8)
    x = model_input([gray, np.zeros((20, 30, 3), np.uint8)])
    assert x.shape == (2, 3, 480, 480)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                        (1 - 0.406) / 0.225], rtol=1e-6)
    with pytest.raises(SliceInputError, match="8-bit"):
        model_input([gray.astype(np.uint16)])
