"""Small, valid DICOM objects made in the tests (for the receiver; phantom studies are in train.phantoms)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def mr_slice(study_uid: str, series_uid: str, index: int, rows: int = 32, columns: int = 32,
             sop_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", "AX T2 FLAIR", 3, index + 1
    ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientAge = "TEST^RECEIVER", "R1", "F", "054Y"
    ds.StudyDate, ds.AccessionNumber, ds.StudyDescription = "20260101", "ACC1", "MRI BRAIN"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 5.0 * index]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 5
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns) + index).tobytes()
    return ds


def write_mr_series(folder: Path, n: int = 4, study_uid: str | None = None) -> list[Path]:
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"slice{i:03d}.dcm"
        mr_slice(study_uid, series_uid, i).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
