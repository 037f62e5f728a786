"""DICOM encoding of phantom series: MR Image Storage, Explicit VR Little Endian, one file per slice
(data.md §5, "DICOM"; PS3.3 A.4 MR Image IOD).

Identity (patient, study, UIDs) is derived from the seed and the patient number, never from a clock or a
random source, so the same call writes byte-identical files. Every attribute a type-1 or type-2 rule of the
IOD asks for is present, so dciodvfy reports no errors.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import format_number_as_ds

from train.phantoms.acquisition import ImageStack, SeriesProtocol, SliceGeometry
from train.phantoms.seeding import rng_for, uid_for

MANUFACTURER = "TriagePhantom"
STUDY_DESCRIPTION = "MRI BRAIN WO CONTRAST"
_MODEL = "Synthetic 3T"
_SOFTWARE = "train.phantoms 1"
_SITES = (
    ("TriagePhantom General Hospital", "PHANTOM-MR1"),
    ("TriagePhantom University Hospital", "PHANTOM-MR2"),
    ("TriagePhantom Community Imaging", "PHANTOM-MR3"),
)
_FIRST_STUDY_DAY = dt.date(2024, 1, 1)
_STUDY_DAYS = 730
_BIRTH_RANGE = (dt.date(1935, 1, 1), dt.date(2004, 12, 31))
_MINUTES_PER_SERIES = 4


@dataclass(frozen=True)
class StudyIdentity:
    """Who and when: the attributes shared by every image of one phantom study."""

    study_uid: str
    frame_of_reference_uid: str
    patient_number: int
    patient_sex: str
    patient_birth_date: dt.date
    study_start: dt.datetime
    accession_number: str
    study_id: str
    institution: str
    station: str

    @property
    def patient_name(self) -> str:
        return f"PHANTOM^{self.patient_number}"

    @property
    def patient_id(self) -> str:
        return f"PHANTOM{self.patient_number:08d}"

    @property
    def patient_age(self) -> str:
        """Age in whole years at the study date, as an AS value ("057Y")."""
        born, day = self.patient_birth_date, self.study_start.date()
        years = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
        return f"{years:03d}Y"


def study_identity(lesion: str, seed: int, fast: bool, patient_number: int) -> StudyIdentity:
    """Identity of the study (lesion, seed, mode) of patient ``patient_number``.

    Sex and birth date depend only on the patient, so several studies of one patient (priors) agree; date,
    time and site depend on the seed and the patient; the UIDs also on the lesion and the mode, so two
    different studies never share a UID.
    """
    patient = rng_for("patient", patient_number)
    sex = "F" if patient.random() < 0.5 else "M"
    birth_span = (_BIRTH_RANGE[1] - _BIRTH_RANGE[0]).days
    birth_date = _BIRTH_RANGE[0] + dt.timedelta(days=int(patient.integers(0, birth_span + 1)))

    visit = rng_for("study", seed, patient_number)
    day = _FIRST_STUDY_DAY + dt.timedelta(days=int(visit.integers(0, _STUDY_DAYS)))
    start = dt.datetime.combine(day, dt.time(7, 0)) + dt.timedelta(seconds=int(visit.integers(0, 12 * 3600)))
    institution, station = _SITES[int(visit.integers(0, len(_SITES)))]

    study_uid = uid_for("study", lesion, seed, "fast" if fast else "full", patient_number)
    digits = study_uid.rsplit(".", 1)[1]
    return StudyIdentity(
        study_uid=study_uid,
        frame_of_reference_uid=uid_for(study_uid, "frame-of-reference"),
        patient_number=patient_number,
        patient_sex=sex,
        patient_birth_date=birth_date,
        study_start=start,
        accession_number=f"PH{digits[-10:]}",
        study_id=digits[-8:],
        institution=institution,
        station=station,
    )


def series_uid(identity: StudyIdentity, protocol: SeriesProtocol) -> str:
    """A series' UID depends on its study and description only, so a subset written later joins the study."""
    return uid_for(identity.study_uid, "series", protocol.description)


def _ds(value: float) -> str:
    # DS is at most 16 characters; round first so that 1e-17-style noise in direction cosines reads as 0.
    return format_number_as_ds(round(float(value), 6) + 0.0)


def _ds_list(values: Sequence[float] | np.ndarray) -> list[str]:
    return [_ds(v) for v in values]


def _date(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _time(moment: dt.datetime) -> str:
    return moment.strftime("%H%M%S")


def _image_type(protocol: SeriesProtocol, stack: ImageStack) -> list[str]:
    if protocol.derived:
        return ["DERIVED", "PRIMARY", "ADC"]
    return ["ORIGINAL", "PRIMARY", "DIFFUSION" if stack.contrast.diffusion else "OTHER"]


def _series_dataset(identity: StudyIdentity, protocol: SeriesProtocol, geometry: SliceGeometry,
                    uid: str) -> Dataset:
    """Attributes common to every image of a series (copied into each instance)."""
    series_start = identity.study_start + dt.timedelta(minutes=_MINUTES_PER_SERIES * (protocol.number - 1))
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = _date(identity.study_start)
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _date(series_start)
    ds.StudyTime = _time(identity.study_start)
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _time(series_start)
    ds.AccessionNumber = identity.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = identity.institution
    ds.ReferringPhysicianName = "REFERRER^PHANTOM"
    ds.StationName = identity.station
    ds.StudyDescription = STUDY_DESCRIPTION
    ds.SeriesDescription = protocol.description
    ds.ManufacturerModelName = _MODEL
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = _date(identity.patient_birth_date)
    ds.PatientSex = identity.patient_sex
    ds.PatientAge = identity.patient_age
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = list(protocol.scanning_sequence)
    ds.SequenceVariant = list(protocol.sequence_variant)
    ds.ScanOptions = list(protocol.scan_options)  # type 2: present even when empty
    ds.MRAcquisitionType = protocol.acquisition_type
    ds.SliceThickness = _ds(protocol.thickness_mm)
    ds.RepetitionTime = _ds(protocol.repetition_time_ms)
    ds.EchoTime = _ds(protocol.echo_time_ms)
    if protocol.inversion_time_ms is not None:
        ds.InversionTime = _ds(protocol.inversion_time_ms)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "3"
    ds.SpacingBetweenSlices = _ds(geometry.spacing_mm)
    ds.EchoTrainLength = str(protocol.echo_train_length)
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = _SOFTWARE
    ds.ProtocolName = protocol.description
    ds.FlipAngle = _ds(protocol.flip_angle_deg)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = uid
    ds.StudyID = identity.study_id
    ds.SeriesNumber = str(protocol.number)
    ds.AcquisitionNumber = "1"
    ds.ImageOrientationPatient = _ds_list(np.concatenate([geometry.row_direction, geometry.column_direction]))
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""  # type 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geometry.rows
    ds.Columns = geometry.columns
    ds.PixelSpacing = _ds_list([geometry.pixel_mm, geometry.pixel_mm])
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if protocol.derived:
        ds.DerivationDescription = "Apparent diffusion coefficient from b 0 and b 1000, 10^-6 mm2/s"
    return ds


def write_series(
    study_folder: Path,
    identity: StudyIdentity,
    protocol: SeriesProtocol,
    geometry: SliceGeometry,
    stacks: Sequence[ImageStack],
    shuffle_names: bool = False,
) -> tuple[str, list[Path]]:
    """Write one file per image to ``study_folder/<SeriesInstanceUID>/``; return that UID and the paths.

    Instances are numbered through the stacks (DWI: b0 slices first, then b1000), slice 0 = most inferior
    (axial) or rightmost (sagittal). Files are ``NNNN.dcm`` named by InstanceNumber; with ``shuffle_names``
    the numbers are a seeded permutation, so name order says nothing about slice order. Previous ``*.dcm``
    files in the folder (a rerun of the same series) are removed first so that no stale instance survives.
    """
    uid = series_uid(identity, protocol)
    folder = study_folder / uid
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.dcm"):
        stale.unlink()
    common = _series_dataset(identity, protocol, geometry, uid)
    count = sum(stack.pixels.shape[0] for stack in stacks)
    names = np.arange(1, count + 1)
    if shuffle_names:
        names = rng_for("file-names", uid).permutation(names)
    normal = geometry.normal

    paths: list[Path] = []
    instance = 0
    for stack_index, stack in enumerate(stacks):
        sequence_name = protocol.sequence_names[stack_index]
        image_type = _image_type(protocol, stack)
        for k in range(stack.pixels.shape[0]):
            instance += 1
            position = geometry.position(k)
            ds = Dataset()
            ds.update(common)
            ds.ImageType = image_type
            ds.SOPInstanceUID = uid_for(uid, "instance", instance)
            ds.SequenceName = sequence_name
            ds.InstanceNumber = str(instance)
            ds.ImagePositionPatient = _ds_list(position)
            ds.SliceLocation = _ds(float(position @ normal))
            ds.WindowCenter = _ds(stack.window_centre)
            ds.WindowWidth = _ds(stack.window_width)
            if stack.contrast.diffusion:
                ds.DiffusionBValue = float(stack.contrast.b_value)
            ds.PixelData = np.ascontiguousarray(stack.pixels[k]).tobytes()

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.file_meta = meta
            path = folder / f"{names[instance - 1]:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return uid, paths
