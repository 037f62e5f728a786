"""Checking a received dataset before it is accepted: parsable, complete, consistent, with safe UIDs.

Pixel data is never decoded here. The checks are what a receiver can afford per image: a full parse of the
element structure (pixel data is read as bytes), the identifying attributes, and, for image objects, that the
pixel data is as long as the image attributes say (pydicom silently accepts a truncated value).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pacs_bridge.storage import InvalidUID, validate_uid

# DIMSE C-STORE status codes (PS3.4 Annex B.2.3, PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

#: Attributes kept in the bookkeeping database (no patient identifiers).
_STUDY_ATTRIBUTES = ("AccessionNumber", "StudyDescription", "PatientSex", "PatientAge", "StudyDate")


class RejectedInstance(Exception):
    """A received object that cannot be accepted; ``status`` is the C-STORE status to answer with."""

    def __init__(self, reason: str, status: int = STATUS_CANNOT_UNDERSTAND) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes of an accepted instance, as the store and the bookkeeping need them."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    series_description: str
    series_number: int | None
    manufacturer: str
    study_attributes: dict[str, str]


def check_received(data: bytes, sop_class_uid: str | None = None, sop_instance_uid: str | None = None) -> InstanceHeader:
    """Parse and check ``data`` (a DICOM file with meta); raise :class:`RejectedInstance` with the reason.

    ``sop_class_uid``/``sop_instance_uid`` are the values of the C-STORE request, which must agree with the
    dataset (a mismatch means the sender and the object disagree about what is being stored).
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise RejectedInstance(f"not a DICOM dataset: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on malformed input
        raise RejectedInstance(f"malformed DICOM dataset ({type(exc).__name__}: {exc})") from exc
    try:
        # Touch every element: deferred parse errors (bad VRs, broken sequences) surface here, not later.
        for _ in ds.iterall():
            pass
    except Exception as exc:
        raise RejectedInstance(f"malformed DICOM dataset ({type(exc).__name__}: {exc})") from exc

    if not any(keyword in ds for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")):
        # pydicom reads almost any bytes as *some* elements; without a single identifying attribute this is not
        # a DICOM dataset (text, an image file, random data behind a valid meta header).
        raise RejectedInstance("not a DICOM dataset: no SOP Class, SOP Instance or Study Instance UID in it")
    try:
        study_uid = validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop_uid = validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        class_uid = validate_uid(ds.get("SOPClassUID"), "SOPClassUID")
    except InvalidUID as exc:
        raise RejectedInstance(str(exc), STATUS_DATASET_MISMATCH) from exc
    if sop_instance_uid is not None and str(sop_instance_uid).rstrip("\x00") != sop_uid:
        raise RejectedInstance(
            f"SOPInstanceUID {sop_uid} differs from the request's Affected SOP Instance UID {sop_instance_uid}",
            STATUS_DATASET_MISMATCH,
        )
    if sop_class_uid is not None and str(sop_class_uid).rstrip("\x00") != class_uid:
        raise RejectedInstance(
            f"SOPClassUID {class_uid} differs from the request's Affected SOP Class UID {sop_class_uid}",
            STATUS_DATASET_MISMATCH,
        )
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        _check_pixel_data_length(ds, transfer_syntax)

    series_number = ds.get("SeriesNumber")
    try:
        series_number = int(series_number) if series_number not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    return InstanceHeader(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=class_uid,
        transfer_syntax_uid=transfer_syntax,
        modality=str(ds.get("Modality", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or "")[:128],
        series_number=series_number,
        manufacturer=str(ds.get("Manufacturer", "") or ""),
        study_attributes={k: str(ds.get(k, "") or "")[:64] for k in _STUDY_ATTRIBUTES},
    )


def _check_pixel_data_length(ds: Dataset, transfer_syntax: str) -> None:
    if "PixelData" not in ds:
        return
    value = ds.PixelData
    try:
        encapsulated = bool(transfer_syntax) and UID(transfer_syntax).is_encapsulated
    except ValueError as exc:  # pydicom: "UID is not a transfer syntax"
        raise RejectedInstance(f"TransferSyntaxUID {transfer_syntax[:80]!r} is not a known transfer syntax") from exc
    if encapsulated:
        try:
            fragments = sum(1 for _ in generate_fragments(value))
        except Exception as exc:
            raise RejectedInstance(f"encapsulated pixel data is malformed: {exc}") from exc
        if fragments == 0:
            raise RejectedInstance("encapsulated pixel data holds no fragments")
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise RejectedInstance(f"image attributes missing or invalid ({exc})", STATUS_DATASET_MISMATCH) from exc
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2  # chroma subsampled 2:1 horizontally: two samples per pixel on average (PS3.3 C.7.6.3.1.2)
    expected_bits = rows * columns * bits * samples * frames
    expected = (expected_bits + 7) // 8
    if len(value) < expected:
        raise RejectedInstance(
            f"pixel data is truncated: {len(value)} bytes where Rows {rows} x Columns {columns} x "
            f"BitsAllocated {bits} x SamplesPerPixel {samples} x Frames {frames} need {expected}"
        )
