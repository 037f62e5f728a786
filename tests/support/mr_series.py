"""Synthetic DICOM series for the models tests: exact, known geometry written as real files (checked by
tests/unit/test_models_support.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def oblique(degrees: float) -> tuple[float, ...]:
    """An axial plane turned by ``degrees`` about the S axis and tilted by half that about L."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    turn = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rotation = tilt @ turn
    return tuple(rotation[:, 0]) + tuple(rotation[:, 1])


def base_dataset(
    series_uid: str, study_uid: str, description: str, sop_class: str = MRImageStorage
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(prefix=None, entropy_srcs=[study_uid])
    ds.Modality = "MR"
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def save(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    file_ds = FileDataset(str(path), ds, file_meta=meta, preamble=b"\0" * 128)
    file_ds.save_as(path, enforce_file_format=True)
    return path


def slice_positions(
    orientation: Sequence[float], n_slices: int, slice_spacing: float, origin: Sequence[float]
) -> list[np.ndarray]:
    normal = np.cross(orientation[:3], orientation[3:])
    return [np.asarray(origin, dtype=float) + k * slice_spacing * normal for k in range(n_slices)]


def write_series(
    folder: Path,
    *,
    n_slices: int = 6,
    rows: int = 64,
    columns: int = 64,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (3.5, 3.5),
    slice_spacing: float = 5.0,
    origin: Sequence[float] = (-110.0, -120.0, -30.0),
    description: str = "AX T1 POST+C",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "NONE"),
    pixels: Callable[[int], np.ndarray] | None = None,
    seed: int = 0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    file_order: str = "reversed",
    sop_class: str = MRImageStorage,
    extra: Mapping[str, object] | None = None,
) -> tuple[list[Path], list[np.ndarray], list[np.ndarray]]:
    """Write a stack of single-frame MR images; returns (paths, true positions, true pixel arrays).

    Slice k (0 = first along the slice normal) gets the position origin + k * spacing * normal and pixels
    ``pixels(k)`` (random int16 by default). Files are named so that name order is NOT position order
    (``file_order`` "reversed" or "shuffled"), and InstanceNumber is scrambled too, so a loader that sorts by
    either gets it wrong. ``extra``: further attributes by keyword (DiffusionBValue, EchoNumbers, ...).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    positions = slice_positions(orientation, n_slices, slice_spacing, origin)
    images = [
        pixels(k) if pixels is not None else rng.integers(0, 1000, size=(rows, columns)).astype(np.int16)
        for k in range(n_slices)
    ]
    names = list(range(n_slices))[::-1] if file_order == "reversed" else list(rng.permutation(n_slices))
    instance_numbers = rng.permutation(n_slices) + 1
    paths = []
    for k in range(n_slices):
        ds = base_dataset(series_uid, study_uid, description, sop_class)
        ds.SOPInstanceUID = generate_uid()
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImageType = list(image_type)
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.10g}" for v in positions[k]]
        ds.PixelSpacing = [f"{v:.10g}" for v in pixel_spacing]
        ds.SliceThickness = f"{slice_spacing:.10g}"
        ds.Rows, ds.Columns = images[k].shape
        ds.PixelData = images[k].astype("<i2").tobytes()
        paths.append(save(ds, folder / f"IM{names[k]:04d}_{ds.SOPInstanceUID[-6:]}.dcm"))
    return paths, positions, images


def write_enhanced_series(
    path: Path,
    *,
    n_frames: int = 5,
    rows: int = 32,
    columns: int = 32,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (2.0, 2.0),
    slice_spacing: float = 4.0,
    origin: Sequence[float] = (-32.0, -32.0, 0.0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
) -> tuple[Path, list[np.ndarray], list[np.ndarray], list[int]]:
    """One Enhanced MR Image file whose frames are stored out of position order.

    Returns (path, true positions, true pixels, stored frame index of each position).
    """
    rng = np.random.default_rng(seed)
    positions = slice_positions(orientation, n_frames, slice_spacing, origin)
    images = [rng.integers(0, 1000, size=(rows, columns)).astype(np.int16) for _ in range(n_frames)]
    stored_order = list(rng.permutation(n_frames))  # stored frame f shows position stored_order[f]
    ds = base_dataset(generate_uid(), generate_uid(), "SAG 3D T1", "1.2.840.10008.5.1.4.1.1.4.1")
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "T1", "NONE"]
    ds.NumberOfFrames = n_frames
    ds.Rows, ds.Columns = rows, columns
    shared = Dataset()
    plane_orientation = Dataset()
    plane_orientation.ImageOrientationPatient = list(orientation)
    measures = Dataset()
    measures.PixelSpacing = list(pixel_spacing)
    measures.SliceThickness = slice_spacing
    shared.PlaneOrientationSequence = [plane_orientation]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for position_index in stored_order:
        group = Dataset()
        plane_position = Dataset()
        plane_position.ImagePositionPatient = [float(v) for v in positions[position_index]]
        group.PlanePositionSequence = [plane_position]
        frame_type = Dataset()
        frame_type.FrameType = ["ORIGINAL", "PRIMARY", "T1", "NONE"]
        group.MRImageFrameTypeSequence = [frame_type]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    frames = np.stack([images[p] for p in stored_order])
    ds.PixelData = frames.astype("<i2").tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(transfer_syntax, frames.astype(np.int16))
    return (
        save(ds, path, transfer_syntax),
        positions,
        images,
        [stored_order.index(p) for p in range(n_frames)],
    )


def head_slice(rows: int = 64, columns: int = 64, radius: float = 0.4) -> np.ndarray:
    """A bright disc with texture on dark air, like an axial head slice (int16)."""
    yy, xx = np.mgrid[:rows, :columns]
    inside = np.hypot(yy - rows / 2, xx - columns / 2) < radius * min(rows, columns)
    return np.where(inside, 400 + 60 * np.sin(xx / 3.0) * np.cos(yy / 4.0), 0).astype(np.int16)


def write_head_study(folder: Path, n_slices: Sequence[int] = (12, 10, 8)) -> dict[str, list[Path]]:
    """An axial, a coronal and a sagittal head-like series of one study: {series uid: paths}."""
    study_uid = generate_uid()
    series = {}
    for (name, orientation), n in zip(
        (("AX T2", AXIAL), ("COR T1+C", CORONAL), ("SAG T1", SAGITTAL)), n_slices
    ):
        uid = generate_uid()
        series[uid] = write_series(
            folder / name.replace(" ", "_"),
            orientation=orientation,
            n_slices=n,
            description=name,
            pixels=lambda k: head_slice(),
            series_uid=uid,
            study_uid=study_uid,
        )[0]
    return series
