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

from pacs_bridge.schema_fit import Changes, Fitter, clean_text
from pacs_bridge.storage import InvalidUID, validate_uid
from sql.schema import instances, series, studies

# DIMSE C-STORE status codes (PS3.4 Annex B.2.3, PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

#: Attributes kept in the bookkeeping database (no patient identifiers), with the column each is kept in.
_STUDY_ATTRIBUTES = {
    "AccessionNumber": studies.c.accession_number,
    "StudyDescription": studies.c.study_description,
    "PatientSex": studies.c.patient_sex,
    "PatientAge": studies.c.patient_age,
}

#: Storage SOP classes whose objects are images: without pixel data such an object is not what its class says,
#: and would only fail later, in the worker (PS3.4 B.5; the presentation-state, SR and KOS classes hold none).
IMAGE_STORAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.1",    # CR, DX
    "1.2.840.10008.5.1.4.1.1.2",    # CT, enhanced CT
    "1.2.840.10008.5.1.4.1.1.3.",   # US multi-frame
    "1.2.840.10008.5.1.4.1.1.4",    # MR, enhanced MR (MR spectroscopy excepted below)
    "1.2.840.10008.5.1.4.1.1.6.",   # US
    "1.2.840.10008.5.1.4.1.1.7",    # secondary capture
    "1.2.840.10008.5.1.4.1.1.12.",  # XA, RF
    "1.2.840.10008.5.1.4.1.1.20",   # NM
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT image
)
#: Classes under those prefixes that carry no pixel data.
_NON_IMAGE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.4.2"})  # MR spectroscopy: spectroscopy data, no pixels


def is_image_storage(sop_class_uid: str) -> bool:
    if sop_class_uid in _NON_IMAGE_CLASSES:
        return False
    return any(sop_class_uid == prefix.rstrip(".") or sop_class_uid.startswith(prefix.rstrip(".") + ".")
               for prefix in IMAGE_STORAGE_PREFIXES)


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
    #: The values changed to fit the schema (see :mod:`pacs_bridge.schema_fit`): name -> received and stored.
    normalised: Changes | None = None


def check_received(data: bytes, sop_class_uid: str | None = None, sop_instance_uid: str | None = None,
                   request_in_meta: bool = False) -> InstanceHeader:
    """Parse and check ``data`` (a DICOM file with meta); raise :class:`RejectedInstance` with the reason.

    ``sop_class_uid``/``sop_instance_uid`` are the values of the C-STORE request, which must agree with the
    dataset (a mismatch means the sender and the object disagree about what is being stored).
    ``request_in_meta``: take them from the file meta's Media Storage SOP Class/Instance UID instead (dcmtk's
    storescp writes the request's UIDs there), read in the same parse.
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
    if request_in_meta:
        meta = getattr(ds, "file_meta", None) or {}
        sop_class_uid, sop_instance_uid = meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")
        if sop_class_uid is None or sop_instance_uid is None:
            raise RejectedInstance("no C-STORE request UIDs in the file meta (Media Storage SOP Class/Instance UID)")
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
    fit = Fitter()
    transfer_syntax = fit.text("TransferSyntaxUID", _value(ds.file_meta, "TransferSyntaxUID"),
                               instances.c.transfer_syntax_uid)
    has_pixels = any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if has_pixels:
        _check_pixel_data_length(ds, transfer_syntax)
    elif is_image_storage(class_uid):
        raise RejectedInstance(f"SOP class {class_uid} is an image storage class, but the object has no pixel data",
                               STATUS_DATASET_MISMATCH)

    attributes = {keyword: fit.text(keyword, _value(ds, keyword), column)
                  for keyword, column in _STUDY_ATTRIBUTES.items()}
    attributes["StudyDate"] = fit.date("StudyDate", _value(ds, "StudyDate")) or ""
    return InstanceHeader(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=class_uid,
        transfer_syntax_uid=transfer_syntax,
        modality=fit.text("Modality", _value(ds, "Modality"), series.c.modality),
        series_description=fit.text("SeriesDescription", _value(ds, "SeriesDescription"),
                                    series.c.series_description),
        series_number=fit.int32("SeriesNumber", _value(ds, "SeriesNumber")),
        manufacturer=clean_text(_value(ds, "Manufacturer")),
        study_attributes=attributes,
        normalised=fit.changes or None,
    )


def _value(ds: Dataset, keyword: str) -> object:
    """An element's value as received, or "" when absent or unreadable (a value that does not parse as its VR is
    taken as its raw text: the schema fitting deals with it, the stored file keeps it)."""
    try:
        value = ds.get(keyword, "")
    except Exception:
        element = ds.get_item(keyword) if keyword in ds else None
        raw = getattr(element, "value", b"") if element is not None else b""
        return raw.decode("latin-1", "replace") if isinstance(raw, bytes) else str(raw)
    return "" if value is None else value


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
