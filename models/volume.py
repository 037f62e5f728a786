"""DICOM series -> one voxel volume with correct geometry, in the layout the Prima tokenizer expects.

What it does, in order (``reference/prima.md`` §1 and §7):

1. read every file; drop unreadable files, files of another series and files without pixel data;
2. flatten single-frame and enhanced multi-frame files into one header per image (:mod:`models.dicom_frames`);
3. drop localizer/projection images (ImageType), keep the images with the most common (Rows, Columns);
4. require one orientation for the whole series, sort images by their position along the slice normal
   (``(row cosine x column cosine) . ImagePositionPatient``) -- never by file name (defect D1) or InstanceNumber;
5. decode pixels (compressed transfer syntaxes through pydicom's handlers) and apply RescaleSlope/Intercept;
6. resample each image to 256 x 256 in its own row/column axes, slice axis untouched (:mod:`models.resample`);
7. permute/flip axes to [S][P][L] (:mod:`models.orientation`): axial (n,256,256), coronal (256,n,256),
   sagittal (256,256,n). The thin (slice) axis comes from geometry, so a 256-slice series works (defect D2).

A series that cannot be used raises :class:`SeriesSkipped` with a reason a person can act on;
:func:`load_study` turns that into an entry of its ``skipped`` dict and carries on with the other series.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID

from models.dicom_frames import DicomImage, FrameHeader, decode_frames, frame_headers, read_dataset
from models.orientation import reorient_to_lps
from models.resample import TARGET_IN_PLANE, resample_in_plane

log = logging.getLogger(__name__)

#: ImageType / FrameType values that mark images which are not part of a diagnostic volume.
SKIP_IMAGE_TYPES: frozenset[str] = frozenset({"LOCALIZER", "SCOUT", "PROJECTION IMAGE", "MIP", "SCREEN SAVE"})
#: SOP classes of secondary captures (screenshots, scanned documents): never an acquired volume.
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
#: A series with at most this many images in more than one orientation is taken for a multi-plane localizer.
LOCALIZER_MAX_IMAGES = 12
#: Orientation cosines may differ by this much between images of one stack (DS rounding, table drift).
ORIENTATION_TOLERANCE = 1e-2
#: Two images closer than this along the slice normal (mm) occupy the same slice position.
SAME_POSITION_TOLERANCE_MM = 1e-3


class SeriesSkipped(Exception):
    """A series that cannot be turned into a volume; ``reason`` says why, for logs and the skipped list."""

    def __init__(self, reason: str, series_instance_uid: str = "") -> None:
        super().__init__(f"series {series_instance_uid}: {reason}" if series_instance_uid else reason)
        self.reason = reason
        self.series_instance_uid = series_instance_uid


@dataclass(frozen=True)
class SliceSource:
    """The source image of one slice of a volume and its plane geometry (enough to map points back to it)."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None  # 1-based frame of a multi-frame image, None for a single-frame image
    image_position: tuple[float, float, float]  # centre of the image's first pixel, LPS mm
    row_cosine: tuple[float, float, float]  # direction of increasing column index
    column_cosine: tuple[float, float, float]  # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm, of the source image
    rows: int
    columns: int

    @property
    def pixel_from_patient(self) -> np.ndarray:
        """3 x 4 matrix: LPS point (homogeneous) -> (column, row, distance from the plane in mm).

        Column and row are in the SCOORD convention of DICOM SR: (0, 0) is the top-left corner of the top-left
        pixel, so the centre of pixel (r, c) maps to (c + 0.5, r + 0.5).
        """
        row_cosine = np.asarray(self.row_cosine)
        column_cosine = np.asarray(self.column_cosine)
        normal = np.cross(row_cosine, column_cosine)
        origin = np.asarray(self.image_position)
        matrix = np.zeros((3, 4))
        matrix[0, :3] = row_cosine / self.pixel_spacing[1]
        matrix[1, :3] = column_cosine / self.pixel_spacing[0]
        matrix[2, :3] = normal
        matrix[:, 3] = -matrix[:, :3] @ origin + np.array([0.5, 0.5, 0.0])
        return matrix

    def patient_to_pixel(self, points_lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS points -> (N, 3) of (column, row, distance mm) in this image, SCOORD convention."""
        points = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
        return points @ self.pixel_from_patient[:, :3].T + self.pixel_from_patient[:, 3]


@dataclass
class SeriesVolume:
    """One series as a float32 volume in [S][P][L] array order with its geometry and provenance."""

    series_instance_uid: str
    name: str  # Prima-sanitised series name (reference/prima.md §1.2), input of the series-name encoder
    array: np.ndarray  # float32, rescaled values, axes [S][P][L]
    affine_lps: np.ndarray  # 4 x 4: (i0, i1, i2, 1) array index -> LPS mm (voxel centres)
    thin_axis: int  # the array axis along which the source images are stacked
    source: list[SliceSource]  # one per index along thin_axis, in array order
    series_description: str = ""
    modality: str = ""
    notes: list[str] = field(default_factory=list)  # tolerated oddities (dropped files, uneven spacing)
    label: str = ""  # which volume of a 4-D series ("b1000", "e2", "t3"); "" for an ordinary series

    @property
    def volume_id(self) -> str:
        """Unique within a study: the SeriesInstanceUID, with the label of a 4-D series' volume after a '#'."""
        return f"{self.series_instance_uid}#{self.label}" if self.label else self.series_instance_uid

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (mm) along each array axis."""
        return np.linalg.norm(self.affine_lps[:3, :3], axis=0)

    def index_to_patient(self, index: np.ndarray) -> np.ndarray:
        """(N, 3) array indices (may be fractional) -> (N, 3) LPS mm."""
        index = np.atleast_2d(np.asarray(index, dtype=np.float64))
        return index @ self.affine_lps[:3, :3].T + self.affine_lps[:3, 3]

    def slice_source(self, index_along_thin_axis: int) -> SliceSource:
        return self.source[index_along_thin_axis]


def sanitise_name_part(text: str) -> str:
    """Prima's character clean-up of SeriesDescription/ProtocolName (tools/DicomUtils.py)."""
    if not text:
        return ""
    text = text.replace("+", "_plus_").replace("*", "_star_")
    return re.sub(r"[^a-zA-Z0-9]", "_", text)


def prima_series_name(series_description: str, protocol_name: str, series_instance_uid: str) -> str:
    """The series name Prima's name encoder was trained on (``reference/prima.md`` §1.2)."""
    description = sanitise_name_part(series_description)
    protocol = sanitise_name_part(protocol_name)
    if description and protocol:
        return description if description == protocol else f"{description}-{protocol}-Protocol"
    if description:
        return description
    if protocol:
        return f"{protocol}-Protocol"
    return f"UNK-{series_instance_uid}"


def _has_pixels(ds: DicomImage) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _sop_class_name(uid: str) -> str:
    return UID(uid).name or uid


def _read_series_datasets(paths: Sequence[Path]) -> tuple[list[tuple[Path, DicomImage]], list[str]]:
    datasets, notes = [], []
    for path in paths:
        try:
            datasets.append((path, read_dataset(path)))
        # Found by fuzzing: BytesLengthException (a RuntimeError) for an element whose length does not fit its
        # VR, NotImplementedError for an unknown VR.
        except (InvalidDicomError, OSError, ValueError, EOFError, BytesLengthException, NotImplementedError) as error:
            notes.append(f"dropped unreadable file {path.name}: {error}")
    return datasets, notes


def _orientation_groups(headers: Sequence[FrameHeader]) -> list[list[FrameHeader]]:
    groups: list[tuple[np.ndarray, list[FrameHeader]]] = []
    for header in headers:
        vector = np.array(header.row_cosine + header.column_cosine)  # type: ignore[operator]
        for reference, members in groups:
            if np.max(np.abs(reference - vector)) <= ORIENTATION_TOLERANCE:
                members.append(header)
                break
        else:
            groups.append((vector, [header]))
    return [members for _, members in groups]


def _integer_dtype(stored: Iterable[np.ndarray], headers: Sequence[FrameHeader]) -> np.dtype | None:
    """The integer type SimpleITK would give the rescaled image, or None when it would be floating point.

    GDCM keeps the stored type when the rescale is the identity and widens it for an integral rescale; any
    fractional slope or intercept gives a floating-point image. (A widened type only changes clamping.)
    """
    dtypes = {a.dtype for a in stored}
    if not all(np.issubdtype(d, np.integer) for d in dtypes):
        return None
    rescales = {(h.rescale_slope, h.rescale_intercept) for h in headers}
    if rescales == {(1.0, 0.0)} and len(dtypes) == 1:
        return next(iter(dtypes))
    if all(float(s).is_integer() and float(i).is_integer() for s, i in rescales):
        return np.dtype(np.int32)
    return None


def load_series(paths: Iterable[str | PathLike[str]], **options: Any) -> SeriesVolume:
    """The one volume of a series; raises :class:`SeriesSkipped` with the reason if unusable, ValueError if the
    series holds several volumes (a 4-D series: use :func:`load_series_volumes`). Options as there."""
    volumes = load_series_volumes(paths, **options)
    if len(volumes) > 1:
        raise ValueError(
            f"series {volumes[0].series_instance_uid} holds {len(volumes)} volumes "
            f"({', '.join(v.label for v in volumes)}); use load_series_volumes"
        )
    return volumes[0]


def load_series_volumes(
    paths: Iterable[str | PathLike[str]],
    *,
    allowed_modalities: Sequence[str] | None = ("MR",),
    skip_image_types: Iterable[str] = SKIP_IMAGE_TYPES,
    min_slices: int = 1,
    in_plane_size: int = TARGET_IN_PLANE,
    min_slice_spacing_mm: float | None = None,
) -> list[SeriesVolume]:
    """Build the volume(s) of one series from its files; raises :class:`SeriesSkipped` with the reason if unusable.

    A 4-D series (images sharing slice positions, told apart by DiffusionBValue, diffusion direction, echo or
    temporal position) gives one volume per b-value/direction/echo/time point, each named after the series
    with a suffix (``AX_DWI_b1000``). ``allowed_modalities``: None accepts any modality. ``min_slices``: fewer
    images than this skip the series (1 by default: the tokenizer pads a single slice to one 4-slice patch, as
    the reference does). ``min_slice_spacing_mm``: resample thinner slices to this spacing along the slice axis
    (the paper's ">= 4 mm"; the reference never does it, defect D5, so it is off by default).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise SeriesSkipped("no files")
    datasets, notes = _read_series_datasets(paths)
    if not datasets:
        raise SeriesSkipped(f"none of the {len(paths)} files is readable DICOM ({notes[0]})")

    series_uid = str(datasets[0][1].get("SeriesInstanceUID", ""))
    same_series = [(p, ds) for p, ds in datasets if str(ds.get("SeriesInstanceUID", "")) == series_uid]
    if len(same_series) < len(datasets):
        notes.append(f"dropped {len(datasets) - len(same_series)} files of other series")
    datasets = same_series
    first = datasets[0][1]

    def skip(reason: str) -> SeriesSkipped:
        return SeriesSkipped(reason, series_uid)

    modality = str(first.get("Modality", ""))
    if allowed_modalities is not None and modality not in allowed_modalities:
        raise skip(f"modality {modality or '(none)'} is not one of {', '.join(allowed_modalities)}")
    with_pixels = [(p, ds) for p, ds in datasets if _has_pixels(ds)]
    if not with_pixels:
        sop_class = _sop_class_name(str(first.get("SOPClassUID", "")))
        raise skip(f"no pixel data: {sop_class} is not an image")
    sop_class = str(first.get("SOPClassUID", ""))
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        raise skip(f"{_sop_class_name(sop_class)}: a secondary capture is not an acquired volume")
    if any(int(ds.get("SamplesPerPixel", 1) or 1) != 1 for _, ds in with_pixels):
        raise skip("colour images (SamplesPerPixel > 1) are not a grey-scale MR volume")

    headers: list[FrameHeader] = []
    seen: set[tuple[str, int | None]] = set()
    dataset_by_path = {}
    for path, ds in with_pixels:
        dataset_by_path[path] = ds
        for header in frame_headers(ds, path):
            key = (header.sop_instance_uid, header.frame_index)
            if key not in seen:  # the same instance received twice
                seen.add(key)
                headers.append(header)

    skip_types = {t.upper() for t in skip_image_types}
    kept = [h for h in headers if not skip_types.intersection(h.image_type)]
    if not kept:
        found = sorted(skip_types.intersection(*[set(h.image_type) for h in headers]) or skip_types)
        raise skip(f"all {len(headers)} images are localizer/projection images (ImageType {'/'.join(found)})")
    if len(kept) < len(headers):
        notes.append(f"dropped {len(headers) - len(kept)} localizer/projection images")

    size_counts = Counter((h.rows, h.columns) for h in kept)
    # Most images first; on a tie the larger matrix, so the choice never depends on file order.
    (rows, columns), _ = max(size_counts.items(), key=lambda item: (item[1], item[0]))
    if len(size_counts) > 1:
        notes.append(
            f"kept {size_counts[(rows, columns)]} of {len(kept)} images with matrix {rows}x{columns}"
        )
    kept = [h for h in kept if (h.rows, h.columns) == (rows, columns)]

    missing = [h for h in kept if h.image_position is None or h.row_cosine is None or h.pixel_spacing is None]
    if missing:
        raise skip(
            f"{len(missing)} of {len(kept)} images lack plane geometry "
            "(ImagePositionPatient, ImageOrientationPatient or PixelSpacing)"
        )
    groups = _orientation_groups(kept)
    if len(groups) > 1:
        if len(kept) <= LOCALIZER_MAX_IMAGES:
            raise skip(f"looks like a localizer: {len(kept)} images in {len(groups)} orientations")
        raise skip(f"inconsistent orientation: {len(kept)} images in {len(groups)} orientations")

    reference = kept[0]
    row_cosine = np.asarray(reference.row_cosine, dtype=np.float64)
    column_cosine = np.asarray(reference.column_cosine, dtype=np.float64)
    normal = np.cross(row_cosine, column_cosine)
    if not 0.99 < np.linalg.norm(normal) < 1.01:
        raise skip("ImageOrientationPatient does not hold two orthogonal unit vectors")
    normal /= np.linalg.norm(normal)

    first_header_ds = dataset_by_path[kept[0].path]
    description = str(first_header_ds.get("SeriesDescription", "") or "")
    protocol = str(first_header_ds.get("ProtocolName", "") or "")
    name = prima_series_name(description, protocol, series_uid)
    stacks = _split_4d(kept, normal)
    if len(stacks) > 1:
        notes.append(
            f"4-D series split into {len(stacks)} volumes: {', '.join(label for label, _ in stacks)}"
        )
    for note in notes:
        log.info("series %s: %s", series_uid, note)
    volumes = []
    for label, stack in stacks:
        try:
            volume = _stack_volume(
                stack, normal, dataset_by_path, in_plane_size, min_slices, min_slice_spacing_mm, list(notes)
            )
        except _StackProblem as problem:
            where = f" (volume {label})" if label else ""
            raise skip(f"{problem}{where}") from None
        volume.series_instance_uid = series_uid
        volume.name = f"{name}_{label}" if label else name
        volume.label = label
        volume.series_description = description
        volume.modality = modality
        volumes.append(volume)
    return volumes


class _StackProblem(Exception):
    """A stack of images that cannot become a volume (turned into SeriesSkipped by the caller)."""


def _label_number(value: float) -> str:
    return f"{value:g}".replace(".", "p").replace("-", "m")


def _split_4d(headers: list[FrameHeader], normal: np.ndarray) -> list[tuple[str, list[FrameHeader]]]:
    """[(label, images)]: one entry ("", all) unless images share slice positions and a 4-D attribute varies."""
    along = np.round(
        np.array([np.dot(normal, h.image_position) for h in headers]) / SAME_POSITION_TOLERANCE_MM
    )
    if len(np.unique(along)) == len(headers):
        return [("", headers)]
    directions: dict[tuple[float, ...], int] = {}

    def key(h: FrameHeader) -> tuple:
        gradient = None
        if h.gradient is not None and np.linalg.norm(h.gradient) > 0.5:
            gradient = tuple(np.round(h.gradient, 3))
        return (h.b_value, gradient, h.echo, h.temporal_position)

    keys = [key(h) for h in headers]
    varying = [i for i in range(4) if len({k[i] for k in keys}) > 1]
    if not varying:
        return [("", headers)]  # nothing tells the images apart: the caller reports shared positions
    groups: dict[tuple, list[FrameHeader]] = {}
    for k, header in zip(keys, headers):
        groups.setdefault(tuple(k[i] for i in varying), []).append(header)
    labelled = []
    for group_key, members in sorted(groups.items(), key=lambda item: tuple(_sortable(v) for v in item[0])):
        parts = []
        for i, value in zip(varying, group_key):
            if i == 0:
                parts.append(f"b{_label_number(value)}" if value is not None else "bNA")
            elif i == 1:
                directions.setdefault(value, len(directions) + 1)
                parts.append(f"dir{directions[value]}" if value is not None else "trace")
            elif i == 2:
                parts.append(f"e{_label_number(value)}" if value is not None else "eNA")
            else:
                parts.append(f"t{value}" if value is not None else "tNA")
        labelled.append(("_".join(parts), members))
    return labelled


def _sortable(value: object) -> tuple:
    return (1, ()) if value is None else (0, value if isinstance(value, tuple) else (value,))


def _stack_volume(
    kept: list[FrameHeader],
    normal: np.ndarray,
    dataset_by_path: Mapping[Path, DicomImage],
    in_plane_size: int,
    min_slices: int,
    min_slice_spacing_mm: float | None,
    notes: list[str],
) -> SeriesVolume:
    """One stack of same-orientation images -> a volume (series-level fields are filled in by the caller)."""
    reference = kept[0]
    row_cosine = np.asarray(reference.row_cosine, dtype=np.float64)
    column_cosine = np.asarray(reference.column_cosine, dtype=np.float64)
    rows, columns = reference.rows, reference.columns
    along_normal = np.array([np.dot(normal, h.image_position) for h in kept])  # type: ignore[arg-type]
    order = np.argsort(along_normal, kind="stable")
    kept = [kept[i] for i in order]
    along_normal = along_normal[order]

    if len(kept) < max(min_slices, 1):
        raise _StackProblem(f"{len(kept)} slices, fewer than the {min_slices} required")
    gaps = np.diff(along_normal)
    if np.any(gaps < SAME_POSITION_TOLERANCE_MM):
        shared = int(np.sum(gaps < SAME_POSITION_TOLERANCE_MM))
        raise _StackProblem(
            f"{shared + 1} or more images share slice positions and no b-value, diffusion direction, echo or "
            "temporal position tells them apart"
        )
    if len(kept) > 1:
        slice_spacing = float((along_normal[-1] - along_normal[0]) / (len(kept) - 1))
        if gaps.max() > 1.5 * gaps.min():
            notes.append(f"uneven slice spacing {gaps.min():.3g}-{gaps.max():.3g} mm; affine uses the mean")
    else:
        slice_spacing = reference.spacing_between_slices or reference.slice_thickness or 1.0

    decoded: dict[Path, np.ndarray] = {}
    stored = []
    for header in kept:
        if header.path not in decoded:
            try:
                decoded[header.path] = decode_frames(dataset_by_path[header.path])
            except Exception as error:  # a missing codec or corrupt pixel data names the file
                raise _StackProblem(f"cannot decode pixel data of {header.path.name}: {error}") from error
        frames = decoded[header.path]
        frame = frames[header.frame_index or 0]
        if frame.shape != (rows, columns):
            raise _StackProblem(
                f"{header.path.name}: pixel data {frame.shape} do not match Rows/Columns {rows}x{columns}"
            )
        stored.append(frame)
    integer_dtype = _integer_dtype(stored, kept)
    rescales = {(h.rescale_slope, h.rescale_intercept) for h in kept}
    if (
        rescales == {(1.0, 0.0)}
        and integer_dtype == stored[0].dtype
        and (rows, columns) == (in_plane_size, in_plane_size)
    ):
        # Stored integers already on the target grid: resampling, and clamping to their own type, change
        # nothing; skip the float64 copies of the whole stack (a 3D T1 is 90 MB of them).
        resampled = np.stack(stored).astype(np.float32)
    else:
        stack = np.stack(stored).astype(np.float64)
        if len(rescales) > 1:
            for values, h in zip(stack, kept):
                values *= h.rescale_slope
                values += h.rescale_intercept
        elif rescales != {(1.0, 0.0)}:  # x * 1.0 + 0.0 is x for the integers and floats stored here
            ((slope, intercept),) = rescales
            stack *= slope
            stack += intercept
        resampled = resample_in_plane(stack, in_plane_size, integer_dtype)
    slice_index = np.arange(len(kept), dtype=np.float64)  # source slice position of each volume slice
    if min_slice_spacing_mm is not None and len(kept) > 1 and slice_spacing < min_slice_spacing_mm:
        resampled, slice_index = resample_slices(
            resampled, slice_spacing, min_slice_spacing_mm, integer_dtype
        )
        notes.append(
            f"{len(kept)} slices of {slice_spacing:.3g} mm resampled to {len(slice_index)} of "
            f"{min_slice_spacing_mm:g} mm"
        )
        slice_spacing = min_slice_spacing_mm

    row_spacing, column_spacing = reference.pixel_spacing  # type: ignore[misc]
    native_affine = np.eye(4)
    native_affine[:3, 0] = normal * slice_spacing
    native_affine[:3, 1] = column_cosine * row_spacing * rows / in_plane_size
    native_affine[:3, 2] = row_cosine * column_spacing * columns / in_plane_size
    native_affine[:3, 3] = kept[0].image_position  # type: ignore[assignment]
    array, affine, mapping = reorient_to_lps(resampled, native_affine)

    sources = [
        SliceSource(
            sop_instance_uid=h.sop_instance_uid,
            sop_class_uid=h.sop_class_uid,
            frame_number=h.frame_number,
            image_position=h.image_position,  # type: ignore[arg-type]
            row_cosine=h.row_cosine,  # type: ignore[arg-type]
            column_cosine=h.column_cosine,  # type: ignore[arg-type]
            pixel_spacing=h.pixel_spacing,  # type: ignore[arg-type]
            rows=h.rows,
            columns=h.columns,
        )
        for h in (kept[int(np.rint(i))] for i in slice_index)  # resampled slices: the nearest source image
    ]
    if mapping.flipped[0]:
        sources.reverse()
    return SeriesVolume(
        series_instance_uid="",
        name="",
        array=array,
        affine_lps=affine,
        thin_axis=mapping.target_axis[0],
        source=sources,
        notes=notes,
    )


def resample_slices(
    stack: np.ndarray, spacing: float, new_spacing: float, integer_dtype: np.dtype | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling of a (slices, rows, columns) stack along its slice axis to ``new_spacing`` mm.

    The first output slice sits on the first input slice; output slices continue every ``new_spacing`` mm up
    to the last input slice. Returns the stack (float32; integer images truncated like the in-plane step) and
    the fractional input slice index of each output slice.
    """
    n = stack.shape[0]
    count = int(np.floor((n - 1) * spacing / new_spacing + 1e-9)) + 1
    position = np.arange(count) * (new_spacing / spacing)
    lower = np.minimum(np.floor(position).astype(np.int64), n - 1)
    upper = np.minimum(lower + 1, n - 1)
    weight = (position - lower)[:, None, None]
    values = stack[lower].astype(np.float64) * (1 - weight) + stack[upper].astype(np.float64) * weight
    if integer_dtype is not None:
        info = np.iinfo(integer_dtype)
        values = np.trunc(np.clip(values, info.min, info.max))
    return values.astype(np.float32), position


def load_study(
    paths_by_series: Mapping[str, Sequence[str | PathLike[str]]], **options: object
) -> tuple[list[SeriesVolume], dict[str, str]]:
    """Load every series of a study; returns (volumes, {series uid: reason}) for the ones that were skipped.

    A failing series never stops the study: expected problems arrive as :class:`SeriesSkipped`, anything else is
    logged with its traceback and reported as "failed: ...". ``options`` go to :func:`load_series`.
    """
    volumes: list[SeriesVolume] = []
    skipped: dict[str, str] = {}
    for series_uid, paths in paths_by_series.items():
        try:
            volumes.extend(load_series_volumes(paths, **options))  # type: ignore[arg-type]
        except SeriesSkipped as skipped_series:
            skipped[series_uid] = skipped_series.reason
            log.info("series %s skipped: %s", series_uid, skipped_series.reason)
        except Exception as error:  # one bad series must not cost the study
            skipped[series_uid] = f"failed: {type(error).__name__}: {error}"
            log.exception("series %s failed to load", series_uid)
    return volumes, skipped
