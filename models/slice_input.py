"""DICOM images -> 8-bit pictures -> MedImageInsight input tensors.

MedImageInsight was trained on 8-bit pictures (PNG/JPEG exports of radiographs and slices) and has no DICOM
support of its own, so stored values are first turned into the picture a viewer would show, in this order
(DICOM PS3.3 C.11 and C.7.6.3.1.2):

1. the modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence): stored values -> physical values;
2. the VOI transform when the image carries one: a VOI LUT Sequence (first table) or Window Center/Width (first
   pair, with its VOI LUT Function); its output range is mapped linearly onto 0..255;
3. otherwise a percentile stretch: the ``low``-th..``high``-th percentile of the image onto 0..255
   (1st-99th by default, as Microsoft's MedImageInsight client toolkit does);
4. MONOCHROME1 (bright = low values, e.g. many CR/DX radiographs) inverted, so bone is bright as in training;
5. rounded to the nearest integer, clipped to 0..255.

RGB images (and YBR, which pydicom returns as RGB) with 8 bits pass through unchanged.

The model input is then what the reference preprocessing makes of an 8-bit picture: grayscale copied to RGB,
resized to ``size`` x ``size`` with PIL's antialiased bicubic filter (aspect ratio not kept, no crop), divided by
255 and normalised with the ImageNet mean and standard deviation. PIL is used on purpose: torch's bicubic
interpolation differs from it by up to 0.2 in normalised units.

Volumes: a series (one multi-frame object or many single-frame files) contributes an evenly spaced subset of its
slices (:func:`evenly_spaced`), so an embedding costs the same for a 20- and a 400-slice series.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from models.medimageinsight import IMAGE_MEAN, IMAGE_STD

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class SliceInputError(ValueError):
    """An image that cannot become a model input; the message names the image and the reason."""


@dataclass(frozen=True)
class Slice8:
    """One 8-bit picture of a DICOM image (H, W) grayscale or (H, W, 3) RGB, and where it came from."""

    pixels: np.ndarray
    sop_instance_uid: str
    series_instance_uid: str
    frame: int | None
    transform: str  # voi_lut | window | percentile | rgb


def _where(ds: Dataset, frame: int | None) -> str:
    sop = getattr(ds, "SOPInstanceUID", "?")
    return f"image {sop}" + (f" frame {frame + 1}" if frame is not None else "")


def _voi_output_range(ds: Dataset, voi_index: int = 0) -> tuple[float, float]:
    """The range pydicom's VOI transform maps onto (PS3.3 C.11.2.1.2: the output spans the stored range)."""
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[voi_index]
        descriptor = item.LUTDescriptor
        bits = int(descriptor[2])
        return 0.0, float(2 ** bits - 1)
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 0:
        y_min, y_max = 0.0, float(2 ** bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None and "ModalityLUTSequence" not in ds:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return y_min, y_max


def to_uint8(ds: Dataset, pixels: np.ndarray, frame: int | None = None,
             percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[np.ndarray, str]:
    """One frame's stored values -> (8-bit picture, which transform made it)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    if photometric not in MONOCHROME:
        if pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8:
            return pixels, "rgb"
        raise SliceInputError(f"{_where(ds, frame)}: photometric interpretation {photometric or 'missing'} with "
                              f"{pixels.dtype} samples of shape {pixels.shape} is not supported "
                              f"(grayscale or 8-bit RGB only)")
    modality = np.asarray(apply_modality_lut(pixels, ds))
    values = modality.astype(np.float64)
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if "VOILUTSequence" in ds or has_window:
        # A VOI LUT table is indexed by integer values (a rescale gives integral floats).
        source = np.rint(modality).astype(np.int64) if "VOILUTSequence" in ds and modality.dtype.kind == "f" \
            else modality
        # prefer_lut: a VOI LUT table when both are present, as viewers do by default.
        voi = np.asarray(apply_voi_lut(source, ds, index=0, prefer_lut=True), dtype=np.float64)
        low, high = _voi_output_range(ds)
        transform = "voi_lut" if "VOILUTSequence" in ds else "window"
    else:
        voi = values
        low, high = (float(v) for v in np.percentile(values, percentiles))
        transform = "percentile"
    if high <= low:
        scaled = np.zeros_like(voi)
    else:
        scaled = np.clip((voi - low) / (high - low), 0.0, 1.0) * 255.0
    out = np.rint(scaled).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out, transform


def frame_count(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def evenly_spaced(n_total: int, n_wanted: int) -> list[int]:
    """``n_wanted`` indices spread over ``0..n_total-1`` including both ends (all of them when fewer)."""
    if n_total <= 0:
        return []
    if n_wanted <= 0 or n_wanted >= n_total:
        return list(range(n_total))
    if n_wanted == 1:
        return [n_total // 2]
    return sorted({int(round(i)) for i in np.linspace(0, n_total - 1, n_wanted)})


def dataset_slices(ds: Dataset, frames: list[int] | None = None,
                   percentiles: tuple[float, float] = (1.0, 99.0)) -> list[Slice8]:
    """8-bit pictures of a dataset's frames (all, or the given 0-based frame indices)."""
    try:
        array = ds.pixel_array
    except Exception as exc:  # decoders raise many types
        raise SliceInputError(f"{_where(ds, None)}: pixel data cannot be decoded: {exc}") from exc
    n = frame_count(ds)
    multi = n > 1
    wanted = list(range(n)) if frames is None else frames
    out: list[Slice8] = []
    for f in wanted:
        pixels = array[f] if multi else array
        picture, transform = to_uint8(ds, pixels, f if multi else None, percentiles)
        out.append(Slice8(picture, str(getattr(ds, "SOPInstanceUID", "")),
                          str(getattr(ds, "SeriesInstanceUID", "")), f if multi else None, transform))
    return out


def _slice_position(ds: Dataset) -> float:
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if position is not None and orientation is not None and len(orientation) == 6:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return float(np.dot(normal, np.asarray(position, float)))
    return float(ds.get("InstanceNumber", 0) or 0)


def series_slices(paths: list[Path], max_slices: int,
                  percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[list[Slice8], dict[str, str]]:
    """An evenly spaced subset of at most ``max_slices`` slices of one series, in anatomical order.

    Single-frame files are ordered by their position along the slice normal (else InstanceNumber); a
    multi-frame object contributes its frames. Returns the pictures and, per file that could not be used,
    the reason (the rest of the series goes on).
    """
    headers: list[tuple[float, Path, Dataset]] = []
    problems: dict[str, str] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            problems[str(path)] = f"unreadable: {exc}"
            continue
        headers.append((_slice_position(ds), path, ds))
    headers.sort(key=lambda item: (item[0], str(item[1])))
    # (file index, frame) for every slice of the series, then the subset.
    units = [(i, f) for i, (_, _, ds) in enumerate(headers) for f in range(frame_count(ds))]
    chosen = [units[k] for k in evenly_spaced(len(units), max_slices)]
    slices: list[Slice8] = []
    by_file: dict[int, list[int]] = {}
    for i, f in chosen:
        by_file.setdefault(i, []).append(f)
    for i, frames in by_file.items():
        path = headers[i][1]
        try:
            ds = pydicom.dcmread(path)
            slices += dataset_slices(ds, frames if frame_count(ds) > 1 else None, percentiles)
        except (SliceInputError, Exception) as exc:
            problems[str(path)] = str(exc)
    return slices, problems


def model_input(pictures: list[np.ndarray], size: int = 480):
    """8-bit pictures -> (B, 3, size, size) float32, exactly as the reference preprocessing computes it."""
    import torch
    from PIL import Image

    if not pictures:
        raise SliceInputError("no pictures to encode")
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(3, 1, 1)
    batch = []
    for picture in pictures:
        if picture.dtype != np.uint8:
            raise SliceInputError(f"picture of dtype {picture.dtype}: the model takes 8-bit pictures")
        image = Image.fromarray(picture)
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = image.resize((size, size), Image.BICUBIC)
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        batch.append((tensor - mean) / std)
    return torch.stack(batch)
