"""Per-image headers of a DICOM series, the same for classic single-frame files and enhanced multi-frame files.

A series arrives as files; an enhanced MR file holds many images (frames) whose geometry lives in the Shared
and Per-frame Functional Groups (PS3.3 C.7.6.16) rather than in top-level attributes. This module flattens both
into one :class:`FrameHeader` per image so that :mod:`models.volume` can sort and stack them without caring
where an image came from, and decodes the pixels of a dataset (compressed transfer syntaxes through pydicom's
pixel handlers, i.e. pylibjpeg / its plugins). Uncompressed single-frame files, the common case, are read by
:mod:`models.dicom_native` straight from their bytes, with the same values and pixels; everything else by pydicom.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from models.dicom_native import NativeImage, NotNative, read_native

#: What :func:`read_dataset` gives: a pydicom Dataset, or the same elements of an uncompressed single-frame file.
DicomImage = Dataset | NativeImage
Vector3 = tuple[float, float, float]


@dataclass(frozen=True)
class FrameHeader:
    """What one image (a single-frame file, or one frame of a multi-frame file) says about itself."""

    path: Path
    frame_index: int | None  # 0-based frame in a multi-frame file; None for a single-frame file
    sop_instance_uid: str
    sop_class_uid: str
    rows: int
    columns: int
    image_position: Vector3 | None  # ImagePositionPatient: centre of the first transmitted pixel, LPS mm
    row_cosine: Vector3 | None  # ImageOrientationPatient[0:3]: direction of increasing column index
    column_cosine: Vector3 | None  # ImageOrientationPatient[3:6]: direction of increasing row index
    pixel_spacing: tuple[float, float] | None  # PixelSpacing: (between rows, between columns) in mm
    rescale_slope: float
    rescale_intercept: float
    image_type: tuple[str, ...]  # ImageType, or the frame's FrameType in an enhanced image
    slice_thickness: float | None
    spacing_between_slices: float | None
    # What tells apart images of a 4-D series that share a slice position (DWI b-values, echoes, time points).
    b_value: float | None = None  # DiffusionBValue (0018,9087)
    gradient: Vector3 | None = None  # DiffusionGradientOrientation (0018,9089)
    echo: float | None = None  # EchoNumbers (0018,0086), else the echo time
    temporal_position: int | None = None  # TemporalPositionIdentifier (0020,0100) / TemporalPositionIndex

    @property
    def frame_number(self) -> int | None:
        """1-based frame number as DICOM references it (ReferencedFrameNumber), None for single-frame."""
        return None if self.frame_index is None else self.frame_index + 1


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _float(value: object) -> float | None:
    try:
        return None if value is None or value == "" else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _integer(value: object) -> int | None:
    number = _float(value)
    return None if number is None else int(number)


def _gradient(sequence: object) -> Vector3 | None:
    items = sequence or []
    return _floats(items[0].get("DiffusionGradientOrientation"), 3) if items else None  # type: ignore[return-value, index]


def _first_item(group: Dataset | None, sequence_keyword: str) -> Dataset | None:
    if group is None:
        return None
    sequence = group.get(sequence_keyword)
    return sequence[0] if sequence else None


def _functional_attribute(
    shared: Dataset | None, per_frame: Dataset | None, sequence_keyword: str, keyword: str
) -> object:
    """An attribute of a functional group macro, per-frame value first, then the shared one (PS3.3 C.7.6.16)."""
    for group in (per_frame, shared):
        item = _first_item(group, sequence_keyword)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _is_multiframe(ds: DicomImage) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def frame_headers(ds: DicomImage, path: Path) -> list[FrameHeader]:
    """One header per image held by ``ds`` (read from ``path``)."""
    common = {
        "path": path,
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
    }
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or ()))
    if not _is_multiframe(ds):
        orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        return [
            FrameHeader(
                frame_index=None,
                image_position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                row_cosine=orientation[:3] if orientation else None,  # type: ignore[arg-type]
                column_cosine=orientation[3:] if orientation else None,  # type: ignore[arg-type]
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
                rescale_slope=_float(ds.get("RescaleSlope")) or 1.0,
                rescale_intercept=_float(ds.get("RescaleIntercept")) or 0.0,
                image_type=image_type,
                slice_thickness=_float(ds.get("SliceThickness")),
                spacing_between_slices=_float(ds.get("SpacingBetweenSlices")),
                b_value=_float(ds.get("DiffusionBValue")),
                gradient=_floats(ds.get("DiffusionGradientOrientation"), 3),  # type: ignore[arg-type]
                echo=_float(ds.get("EchoNumbers")) or _float(ds.get("EchoTime")),
                temporal_position=_integer(ds.get("TemporalPositionIdentifier")),
                **common,  # type: ignore[arg-type]
            )
        ]

    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame_groups = ds.get("PerFrameFunctionalGroupsSequence") or []
    n_frames = int(ds.get("NumberOfFrames", len(per_frame_groups)) or len(per_frame_groups))
    headers = []
    for index in range(n_frames):
        attribute = partial(
            _functional_attribute, shared, per_frame_groups[index] if index < len(per_frame_groups) else None
        )

        orientation = _floats(attribute("PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        # FrameTypeSequence: enhanced objects that are not MR (CT, generic).
        frame_type = attribute("MRImageFrameTypeSequence", "FrameType") or attribute(
            "FrameTypeSequence", "FrameType"
        )
        slope = _float(attribute("PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _float(attribute("PixelValueTransformationSequence", "RescaleIntercept"))
        headers.append(
            FrameHeader(
                frame_index=index,
                image_position=_floats(  # type: ignore[arg-type]
                    attribute("PlanePositionSequence", "ImagePositionPatient"), 3
                ),
                row_cosine=orientation[:3] if orientation else None,  # type: ignore[arg-type]
                column_cosine=orientation[3:] if orientation else None,  # type: ignore[arg-type]
                pixel_spacing=_floats(  # type: ignore[arg-type]
                    attribute("PixelMeasuresSequence", "PixelSpacing"), 2
                ),
                rescale_slope=slope if slope is not None else _float(ds.get("RescaleSlope")) or 1.0,
                rescale_intercept=(
                    intercept if intercept is not None else _float(ds.get("RescaleIntercept")) or 0.0
                ),
                image_type=tuple(str(v).upper() for v in frame_type) if frame_type else image_type,
                slice_thickness=_float(attribute("PixelMeasuresSequence", "SliceThickness")),
                spacing_between_slices=_float(attribute("PixelMeasuresSequence", "SpacingBetweenSlices")),
                b_value=_float(attribute("MRDiffusionSequence", "DiffusionBValue")),
                gradient=_gradient(attribute("MRDiffusionSequence", "DiffusionGradientDirectionSequence")),
                echo=_float(attribute("MREchoSequence", "EffectiveEchoTime")),
                temporal_position=_integer(attribute("FrameContentSequence", "TemporalPositionIndex")),
                **common,  # type: ignore[arg-type]
            )
        )
    return headers


#: The elements a volume is built from: identity, the series name, the image's geometry and type, the 4-D
#: attributes, the functional groups of an enhanced image, and the Image Pixel module (PS3.3 C.7.6.3) that
#: pixel decoding reads. Nothing else of a file is parsed (private tags, patient and acquisition details).
VOLUME_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription", "ProtocolName",
    "ImageType", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept", "DiffusionBValue", "DiffusionGradientOrientation",
    "EchoNumbers", "EchoTime", "TemporalPositionIdentifier", "NumberOfFrames",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "FloatPixelData", "DoubleFloatPixelData", "PixelData",
)


def read_dataset(path: Path, *, native: bool = True) -> DicomImage:
    """The elements of one file that a volume needs (:data:`VOLUME_KEYWORDS`); pixel data stay encoded until
    :func:`decode_frames`.

    An uncompressed single-frame file is read by :func:`models.dicom_native.read_native` (``native=False``
    forces pydicom, the reference the native reader is tested against). With pydicom, only those elements are read (``specific_tags``: the others are skipped by their length, never converted),
    and each of them is converted here, so a malformed one (an unknown VR, a bad length: pydicom defers these)
    fails while the file is read, where it is dropped with a reason, not later in the middle of geometry.
    """
    if native:
        try:
            return read_native(path)
        except NotNative:
            pass
    ds = pydicom.dcmread(path, specific_tags=list(VOLUME_KEYWORDS))
    for _ in ds.iterall():
        pass
    return ds


def decode_frames(ds: DicomImage) -> np.ndarray:
    """Stored pixel values of every frame as (frames, rows, columns), before any rescale."""
    if isinstance(ds, NativeImage):
        return ds.frames()
    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    return pixels
