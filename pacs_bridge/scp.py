"""The DICOM receiver: a pynetdicom C-STORE and C-ECHO SCP.

The C-STORE handler does three cheap things: check the received bytes (:mod:`pacs_bridge.intake`), write them
as they came (:mod:`pacs_bridge.storage`), and queue a row for the database (:mod:`pacs_bridge.bookkeeping`).
Everything else (study completion, routing, processing) happens elsewhere, after the association's work is done.
Rejected input is quarantined with its reason and answered with a failure status; the SCP keeps serving.
"""
from __future__ import annotations

import collections
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from pacs_bridge import pynetdicom_adapter as adapter
from pacs_bridge.bookkeeping import Bookkeeper, ReceivedInstance
from pacs_bridge.dicom_tls import DeferredHandshakeContext, PeerBindings, server_context
from pacs_bridge.intake import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, RejectedInstance, check_received
from pacs_bridge.scp_settings import ScpSettings
from pacs_bridge.storage import InstanceStore

log = logging.getLogger(__name__)

#: Storage SOP classes accepted. Images we may process, plus the SR/presentation classes a PACS may route back
#: to us (they are kept and never processed: loop prevention happens at routing).
STORAGE_SOP_CLASSES = {
    "MRImageStorage": "1.2.840.10008.5.1.4.1.1.4",
    "EnhancedMRImageStorage": "1.2.840.10008.5.1.4.1.1.4.1",
    "MRSpectroscopyStorage": "1.2.840.10008.5.1.4.1.1.4.2",
    "EnhancedMRColorImageStorage": "1.2.840.10008.5.1.4.1.1.4.3",
    "LegacyConvertedEnhancedMRImageStorage": "1.2.840.10008.5.1.4.1.1.4.4",
    "CTImageStorage": "1.2.840.10008.5.1.4.1.1.2",
    "EnhancedCTImageStorage": "1.2.840.10008.5.1.4.1.1.2.1",
    "ComputedRadiographyImageStorage": "1.2.840.10008.5.1.4.1.1.1",
    "DigitalXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.1",
    "DigitalXRayImageStorageForProcessing": "1.2.840.10008.5.1.4.1.1.1.1.1",
    "SecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7",
    "BasicTextSRStorage": "1.2.840.10008.5.1.4.1.1.88.11",
    "EnhancedSRStorage": "1.2.840.10008.5.1.4.1.1.88.22",
    "ComprehensiveSRStorage": "1.2.840.10008.5.1.4.1.1.88.33",
    "Comprehensive3DSRStorage": "1.2.840.10008.5.1.4.1.1.88.34",
    "KeyObjectSelectionDocumentStorage": "1.2.840.10008.5.1.4.1.1.88.59",
    "GrayscaleSoftcopyPresentationStateStorage": "1.2.840.10008.5.1.4.1.1.11.1",
}

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


#: How often the free space on the store's disk is looked up (a statfs per image would cost more than the write).
FREE_SPACE_CHECK_S = 1.0


class BackPressure:
    """Why the receiver should not take more now (the database far behind, the disk nearly full), or None.

    Both receiver engines ask it: pynetdicom per C-STORE (answered A700), dcmtk per association request
    (rejected-transient). The thresholds are read from ``settings`` at each call, so they can be changed live.
    """

    def __init__(self, settings: ScpSettings, bookkeeper: Bookkeeper, disk: Path) -> None:
        self.settings, self.bookkeeper, self.disk = settings, bookkeeper, disk
        self._free, self._free_checked_at = 0, float("-inf")

    def reason(self) -> str | None:
        stall = self.bookkeeper.stall_s
        if stall > self.settings.max_write_stall_s:
            return (f"the database has taken no write for {stall:.0f}s (scp.max_write_stall_s "
                    f"{self.settings.max_write_stall_s:g}): {self.bookkeeper.last_error}")
        backlog = self.bookkeeper.backlog
        if backlog > self.settings.max_backlog:
            return f"the database is {backlog} instances behind (scp.max_backlog {self.settings.max_backlog})"
        free = self._free_bytes()
        if free < self.settings.min_free_bytes:
            return f"{free // (1 << 20)} MiB free on the store's disk (scp.min_free_bytes {self.settings.min_free_bytes})"
        return None

    def _free_bytes(self) -> int:
        """Free space on the store's disk, asked of the filesystem at most every FREE_SPACE_CHECK_S."""
        now = time.monotonic()
        if now - self._free_checked_at > FREE_SPACE_CHECK_S:
            self._free = shutil.disk_usage(self.disk).free
            self._free_checked_at = now
        return self._free

#: Room for an A-ASSOCIATE-RQ, whose length the negotiated maximum does not bound (real ones are a few KB).
MAX_ASSOCIATION_PDU_BYTES = 64 * 1024

#: How much of a refused oversized object is kept in quarantine (enough to identify it; the rest is not stored).
OVERSIZED_QUARANTINE_BYTES = 64 * 1024


class ActiveStudies:
    """Which studies are still arriving: a study is never complete while one is.

    A study is active while an open association is sending it, and after the association closes until the
    bookkeeper has written everything that association's images added: otherwise a busy database could make
    the study look quiet (its last rows not yet written), complete it early, and re-open it as a second
    version when those rows land.
    """

    def __init__(self, written: Callable[[], int] = lambda: 1 << 62, added: Callable[[], int] = lambda: 0) -> None:
        self._lock = threading.Lock()
        self._by_association: dict[int, set[str]] = {}
        self._closing: list[tuple[int, set[str]]] = []  # (items added when it closed, its studies)
        self._written = written
        self._added = added

    def add(self, association_id: int, study_uid: str) -> None:
        with self._lock:
            self._by_association.setdefault(association_id, set()).add(study_uid)

    def close(self, association_id: int) -> None:
        with self._lock:
            studies = self._by_association.pop(association_id, None)
            if studies:
                self._closing.append((self._added(), studies))

    def current(self) -> set[str]:
        written = self._written()
        with self._lock:
            self._closing = [(mark, studies) for mark, studies in self._closing if mark > written]
            return set().union(*self._by_association.values(), *(studies for _, studies in self._closing))


class StorageSCP:
    """A configured pynetdicom AE with bound handlers; ``start()`` serves in background threads."""

    def __init__(self, settings: ScpSettings, store: InstanceStore, bookkeeper: Bookkeeper) -> None:
        self.settings = settings
        self.store = store
        self.bookkeeper = bookkeeper
        self.active = ActiveStudies(written=lambda: bookkeeper.written, added=lambda: bookkeeper.added)
        # Counts for the metrics endpoint (read by the service's Prometheus collector).
        self.received = 0
        self.deferred = 0  # C-STOREs answered Out of Resources by back-pressure (nothing was kept: the sender has it)
        self.rejected_by_status: collections.Counter[int] = collections.Counter()
        self._server = None
        self.back_pressure = BackPressure(settings, bookkeeper, store.incoming_dir)

        adapter.check_version()
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_pdu_size = settings.max_pdu
        # pynetdicom would count connections that never asked for an association: the slots count negotiated ones.
        self.slots = adapter.AssociationSlots(settings.max_associations)
        ae.maximum_associations = adapter.UNLIMITED_ASSOCIATIONS
        ae.network_timeout = settings.network_timeout_s
        # A peer that connects and does not ask for an association at once is dropped: a legitimate sender sends
        # its A-ASSOCIATE-RQ within milliseconds, and a silent connection costs two threads while it lasts.
        ae.acse_timeout = settings.association_request_timeout_s
        self.bindings = PeerBindings(settings.ae_hosts)
        self.allowed_calling_aets = list(dict.fromkeys([*settings.allowed_calling_aets, *self.bindings.ae_titles]))
        if self.allowed_calling_aets:
            # Our EVT_REQUESTED handler refuses (and records) unknown titles first; pynetdicom's own check stays
            # as a second lock, should that handler ever fail.
            ae.require_calling_aet = self.allowed_calling_aets
        self.refused_associations = 0
        ae.add_supported_context(Verification)
        for uid in STORAGE_SOP_CLASSES.values():
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        self.ae = ae

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_RELEASED, self._on_association_closed),
            (evt.EVT_ABORTED, self._on_association_closed),
            (evt.EVT_CONN_CLOSE, self._on_association_closed),
            (evt.EVT_CONN_OPEN, self._on_connection_opened),
            (evt.EVT_REQUESTED, self._on_association_requested),
        ]
        tls = self.settings.tls
        self._server = self.ae.start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers,
            ssl_context=DeferredHandshakeContext(server_context(tls)) if tls else None,
        )
        log.info("SCP %s listening on %s:%d", self.settings.ae_title, self.settings.host, self.port)

    @property
    def port(self) -> int:
        if self._server is not None:
            return self._server.server_address[1]
        return self.settings.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_c_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_association_closed(self, event: evt.Event) -> None:
        self.active.close(id(event.assoc))
        self.slots.release(event.assoc)

    def _on_connection_opened(self, event: evt.Event) -> None:
        # pynetdicom leaves accepted sockets blocking: a peer that stalls mid-PDU (or mid-TLS-handshake) would hold
        # an association slot for ever. With a timeout every read gives up after network_timeout_s of silence.
        adapter.set_read_timeout(event.assoc, self.settings.network_timeout_s)
        # pynetdicom reads a PDU of whatever length its header claims, into memory, before anything checks it.
        limit = max(self.settings.max_pdu, MAX_ASSOCIATION_PDU_BYTES) if self.settings.max_pdu else 0
        if limit:
            adapter.limit_pdu_reads(event.assoc, limit)
        if self.settings.max_object_bytes:
            # ... and buffers a whole data set before the handler sees it: bound it while it arrives.
            adapter.limit_dataset_bytes(event.assoc, self._dataset_limit(event.assoc))

    def _dataset_limit(self, assoc: object) -> adapter.DatasetLimit:
        limit = getattr(assoc, "_triage_dataset_limit", None)
        if limit is None:
            limit = adapter.DatasetLimit(self.settings.max_object_bytes, OVERSIZED_QUARANTINE_BYTES)
            assoc._triage_dataset_limit = limit  # type: ignore[attr-defined]
        return limit

    def _on_association_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        calling_aet = requestor.primitive.calling_ae_title.strip()
        if self.allowed_calling_aets and calling_aet not in self.allowed_calling_aets:
            self._refuse(event, calling_aet, f"calling AE title {calling_aet} is not allowed",
                         adapter.REJECT_CALLING_AET)
        elif not self.bindings.permits(calling_aet, requestor.address):
            self._refuse(event, calling_aet, f"calling AE title {calling_aet} is not allowed from {requestor.address}",
                         adapter.REJECT_CALLING_AET)
        elif not self.slots.admit(event.assoc):
            self._refuse(event, calling_aet, f"all {self.settings.max_associations} association slots are in use "
                         "(scp.max_associations); the sender may retry", adapter.REJECT_LOCAL_LIMIT)

    def _refuse(self, event: evt.Event, calling_aet: str, reason: str,
                result_source_diagnostic: tuple[int, int, int]) -> None:
        self.refused_associations += 1
        peer = event.assoc.requestor.address
        log.warning("refused association from %s: %s", peer, reason)
        self.bookkeeper.event("association_refused", reason, detail={"calling_aet": calling_aet, "peer": peer})
        adapter.reject(event.assoc, result_source_diagnostic)

    def _on_c_store(self, event: evt.Event) -> int:
        calling_aet = event.assoc.requestor.ae_title.strip()
        request = event.request
        context = {
            "calling_aet": calling_aet,
            "peer": f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
            "affected_sop_class_uid": str(request.AffectedSOPClassUID),
            "affected_sop_instance_uid": str(request.AffectedSOPInstanceUID)[:128],
        }
        busy = self.back_pressure.reason()
        if busy is not None:
            self.deferred += 1
            if self.deferred % 100 == 1:
                log.warning("deferring C-STOREs (Out of Resources, the sender retries): %s", busy)
            return STATUS_OUT_OF_RESOURCES
        data = b""
        try:
            limit = self.settings.max_object_bytes
            oversized = self._dataset_limit(event.assoc).oversized(request.MessageID) if limit else None
            if oversized is not None:
                # Only the head was buffered (pynetdicom_adapter.limit_dataset_bytes); the rest was dropped.
                data = _dataset_head(request.DataSet, OVERSIZED_QUARANTINE_BYTES)
                raise RejectedInstance(f"dataset of {oversized} bytes exceeds scp.max_object_bytes ({limit}); only "
                                       f"its first {len(data)} bytes (no file meta) are kept", STATUS_OUT_OF_RESOURCES)
            data = adapter.encoded_dataset(request.DataSet, event.file_meta)
            header = check_received(data, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID)
            called_aet = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "") or "").strip()
            sender = {"calling_aet": calling_aet, "called_aet": called_aet,
                      "peer_address": event.assoc.requestor.address, "source": "c-store"}
            # Durable (fsynced) when it returns: only then is the sender told Success.
            stored = self.store.store(header.study_instance_uid, header.series_instance_uid,
                                      header.sop_instance_uid, data, sender=sender)
        except RejectedInstance as exc:
            return self._reject(data, exc.reason, exc.status, context)
        except OSError as exc:  # disk full, permissions: tell the sender to try again later
            return self._reject(data, f"could not store: {exc}", STATUS_OUT_OF_RESOURCES, context)
        except Exception as exc:  # never let one bad object take the association (or the SCP) down
            log.exception("unexpected error storing %s", context["affected_sop_instance_uid"])
            return self._reject(data, f"internal error: {type(exc).__name__}: {exc}", STATUS_OUT_OF_RESOURCES,
                                context)
        self.active.add(id(event.assoc), header.study_instance_uid)
        # The called AE title as the sender addressed it (routing rules may test it), not ours.
        self.bookkeeper.add(ReceivedInstance(header=header, stored=stored, calling_aet=calling_aet,
                                             called_aet=called_aet, peer_address=event.assoc.requestor.address))
        self.received += 1
        return STATUS_SUCCESS

    def _reject(self, data: bytes, reason: str, status: int, context: dict[str, str]) -> int:
        self.rejected_by_status[status] += 1
        path = None
        try:
            path = self.store.quarantine(data, reason, {**context, "status": f"0x{status:04X}"})
        except OSError as exc:
            reason = f"{reason}; quarantine also failed: {exc}"
        log.warning("rejected instance from %s: %s (status 0x%04X)", context["calling_aet"], reason, status)
        self.bookkeeper.event(
            "quarantine", reason, sop_instance_uid=context["affected_sop_instance_uid"],
            detail={**context, "status": status, "path": str(path) if path else None},
        )
        return status


def _dataset_head(dataset: object, limit: int) -> bytes:
    if hasattr(dataset, "getbuffer"):
        return bytes(dataset.getbuffer()[:limit])
    position = dataset.tell()  # type: ignore[attr-defined]
    dataset.seek(0)  # type: ignore[attr-defined]
    head = dataset.read(limit)  # type: ignore[attr-defined]
    dataset.seek(position)  # type: ignore[attr-defined]
    return head
