"""Accepting one DICOM object that arrived other than by C-STORE to our SCP: STOW-RS, C-GET, WADO-RS.

The same three steps as the SCP's C-STORE handler, so every way in has the same checks, store, quarantine and
bookkeeping: check the bytes (:func:`pacs_bridge.intake.check_received`), write them as they came
(:class:`pacs_bridge.storage.InstanceStore`), and queue a row for the database (:class:`Bookkeeper`), which
the study assembler then completes and routes like any other. Rejected input is quarantined with its reason and
an event; the outcome carries the status (PS3.4 C-STORE codes, which STOW-RS reports as FailureReason).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import pydicom

from pacs_bridge.bookkeeping import Bookkeeper, ReceivedInstance
from pacs_bridge.intake import (
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    InstanceHeader,
    RejectedInstance,
    check_received,
)
from pacs_bridge.storage import InstanceStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestOutcome:
    status: int
    #: The SOP Class and Instance UIDs, as far as they could be read (empty for bytes that are not DICOM).
    sop_class_uid: str
    sop_instance_uid: str
    reason: str | None = None
    header: InstanceHeader | None = None
    #: False when an identical copy was already held.
    is_new: bool = False

    @property
    def accepted(self) -> bool:
        return self.status == STATUS_SUCCESS


def ingest(data: bytes, store: InstanceStore, bookkeeper: Bookkeeper, *, source: str,
           calling_aet: str | None = None, called_aet: str | None = None, peer_address: str | None = None,
           expected_study_uid: str | None = None, context: dict[str, object] | None = None) -> IngestOutcome:
    """Check, store and record ``data`` (a DICOM file with its meta header), or quarantine it with the reason.

    ``expected_study_uid`` (STOW-RS ``/studies/{uid}``) refuses an instance of another study.
    """
    context = {"source": source, "calling_aet": calling_aet, "peer": peer_address, **(context or {})}
    try:
        header = check_received(data)
        if expected_study_uid is not None and header.study_instance_uid != expected_study_uid:
            raise RejectedInstance(f"StudyInstanceUID {header.study_instance_uid} is not the study "
                                   f"{expected_study_uid} the request was addressed to", STATUS_DATASET_MISMATCH)
        stored = store.store(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid, data,
                             sender={"calling_aet": calling_aet, "called_aet": called_aet,
                                     "peer_address": peer_address, "source": source})
    except RejectedInstance as exc:
        return _reject(data, exc.reason, exc.status, store, bookkeeper, context)
    except OSError as exc:  # disk full, permissions: the sender should try again later
        return _reject(data, f"could not store: {exc}", STATUS_OUT_OF_RESOURCES, store, bookkeeper, context)
    except Exception as exc:  # never let one bad object take the request (or the service) down
        log.exception("unexpected error storing an instance received by %s", source)
        return _reject(data, f"internal error: {type(exc).__name__}: {exc}", STATUS_OUT_OF_RESOURCES, store,
                       bookkeeper, context)
    bookkeeper.add(ReceivedInstance(header=header, stored=stored, calling_aet=calling_aet, called_aet=called_aet,
                                    peer_address=peer_address, source=source))
    return IngestOutcome(STATUS_SUCCESS, header.sop_class_uid, header.sop_instance_uid, header=header,
                         is_new=stored.is_new)


def as_file_format(data: bytes) -> bytes:
    """``data`` as a DICOM file (PS3.10): preamble, ``DICM`` and file meta, which every reader of the store needs.

    STOW-RS parts should be files already, but some clients send the file meta group without the preamble, or a
    bare dataset. The first gets the preamble and prefix put in front, every byte after them as received; the
    second is read and written again with a meta header. Anything else is returned unchanged (and refused by
    :func:`ingest` with its reason).
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return data
    if data[:2] == b"\x02\x00":  # the file meta group, little endian: only the preamble is missing
        return b"\x00" * 128 + b"DICM" + data
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "SOPInstanceUID" not in ds:
            return data
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()
    except Exception:
        return data


def _reject(data: bytes, reason: str, status: int, store: InstanceStore, bookkeeper: Bookkeeper,
            context: dict[str, object]) -> IngestOutcome:
    sop_class_uid, sop_instance_uid = _identify(data)
    path = None
    try:
        path = store.quarantine(data, reason, {**context, "status": f"0x{status:04X}"})
    except OSError as exc:
        reason = f"{reason}; quarantine also failed: {exc}"
    log.warning("rejected instance %s from %s: %s (status 0x%04X)", sop_instance_uid or "?", context.get("source"),
                reason, status)
    bookkeeper.event("quarantine", reason, sop_instance_uid=sop_instance_uid[:128] or None,
                     detail={**context, "status": status, "path": str(path) if path else None})
    return IngestOutcome(status, sop_class_uid, sop_instance_uid, reason)


def _identify(data: bytes) -> tuple[str, str]:
    """The SOP Class and Instance UIDs of bytes that were refused, from the dataset or its meta header."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:
        return "", ""
    meta = getattr(ds, "file_meta", None)

    def first(*values: object) -> str:
        for value in values:
            text = str(value or "").rstrip("\x00").strip()
            if text:
                return text[:64]
        return ""

    try:
        return (first(ds.get("SOPClassUID"), meta.get("MediaStorageSOPClassUID") if meta else None),
                first(ds.get("SOPInstanceUID"), meta.get("MediaStorageSOPInstanceUID") if meta else None))
    except Exception:  # a dataset that parses lazily may still fail on access
        return "", ""
