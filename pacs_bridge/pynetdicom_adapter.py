"""Every place the receiver reaches inside pynetdicom (3.0), in one module, pinned by a test to that version.

pynetdicom's public API has no hook for: a socket read timeout, a bound on the PDU length a peer announces, a bound
on the bytes of one C-STORE while they arrive, or a rejection sent from an event handler. The functions here do
those few things against pynetdicom's internals (``Association.dul.socket``, ``Association.dimse.receive_primitive``,
``Association.acse.send_reject``); ``tests/unit/test_security_pynetdicom_adapter.py`` fails as soon as an upgrade moves
any of them, so the receiver (:mod:`pacs_bridge.scp`) stays on the public API everywhere else.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import pynetdicom
from pydicom.dataset import FileMetaDataset
from pynetdicom.association import Association
from pynetdicom.dsutils import encode_file_meta

log = logging.getLogger(__name__)

#: The pynetdicom release series these internals were read from.
PINNED_SERIES = "3.0."

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # rejected permanent; service user; calling AE title not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected transient; service provider (presentation); local limit exceeded


def check_version() -> None:
    """Raise if the installed pynetdicom is not the series this module was written against."""
    if not pynetdicom.__version__.startswith(PINNED_SERIES):
        raise RuntimeError(f"pacs_bridge.pynetdicom_adapter reaches into pynetdicom {PINNED_SERIES}x internals; "
                           f"pynetdicom {pynetdicom.__version__} is installed (re-check the adapter and its test)")


def set_read_timeout(assoc: Association, seconds: float) -> None:
    """Bound every read on the association's socket (pynetdicom leaves accepted sockets blocking)."""
    assoc.dul.socket.socket.settimeout(seconds)  # type: ignore[union-attr]


class PduTooLarge(Exception):
    """A peer announced a PDU longer than it may send; the association is aborted before it is read."""


def limit_pdu_reads(assoc: Association, limit: int) -> None:
    """Refuse, on this association's socket, any read longer than ``limit`` bytes.

    pynetdicom reads a PDU as a 6-byte header, then one read of the length the header claims. A P-DATA-TF PDU may
    not be longer than the maximum length we negotiated (PS3.8 D.1); raising here makes pynetdicom abort the
    association (A-ABORT) instead of filling memory with whatever a hostile peer sends.
    """
    association_socket = assoc.dul.socket
    read = association_socket.recv  # type: ignore[union-attr]
    peer = assoc.requestor.address

    def recv(nr_bytes: int) -> bytearray:
        if nr_bytes > limit:
            log.warning("aborting the association from %s: it announced a PDU of %d bytes (limit %d)",
                        peer, nr_bytes, limit)
            raise PduTooLarge(f"PDU of {nr_bytes} bytes announced, more than {limit}")
        return read(nr_bytes)

    association_socket.recv = recv  # type: ignore[union-attr,method-assign]


def reject(assoc: Association, result_source_diagnostic: tuple[int, int, int]) -> None:
    """Send an A-ASSOCIATE-RJ from an ``EVT_REQUESTED`` handler and end the association.

    pynetdicom then skips its own negotiation (it sees the association rejected) and waits, as for its own
    rejections, until the reject is on the wire before the socket is closed.
    """
    assoc.acse.send_reject(*result_source_diagnostic)
    assoc.kill()


class AssociationSlots:
    """``max_associations`` counted over negotiated associations only.

    pynetdicom counts every connection's thread, including connections that have not sent an A-ASSOCIATE-RQ yet,
    so a few silent TCP connections would hold every slot. The receiver sets pynetdicom's own limit out of reach
    and asks :meth:`admit` when a request arrives; a slot is held while the admitted association's thread lives.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._admitted: dict[int, Association] = {}

    def admit(self, assoc: Association) -> bool:
        with self._lock:
            # Threads that have ended free their slot, whichever way they ended (release, abort, timeout, kill).
            self._admitted = {key: a for key, a in self._admitted.items() if a.is_alive() and not a._kill}
            if len(self._admitted) >= self.limit:
                return False
            self._admitted[id(assoc)] = assoc
            return True

    def release(self, assoc: Association) -> None:
        with self._lock:
            self._admitted.pop(id(assoc), None)

    @property
    def in_use(self) -> int:
        with self._lock:
            return sum(1 for a in self._admitted.values() if a.is_alive() and not a._kill)


#: pynetdicom's own association limit, set out of reach: :class:`AssociationSlots` decides.
UNLIMITED_ASSOCIATIONS = 1 << 20


@dataclass
class DatasetLimit:
    """One association's C-STORE data sets, bounded while they arrive.

    pynetdicom appends every data-set fragment of a message to a buffer and only then hands the message over. Once
    a message's data set passes ``limit`` bytes, only its first ``head_bytes`` stay in that buffer: the rest is
    counted and dropped, and the handler (:meth:`oversized`) answers Out of Resources with the head quarantined.
    """

    limit: int
    head_bytes: int
    #: Message ID -> bytes received, for messages that went over the limit (until the handler takes it).
    _oversized: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def oversized(self, message_id: int) -> int | None:
        """The data set's full size if the message ``message_id`` went over the limit (once per message), else None."""
        with self._lock:
            return self._oversized.pop(message_id, None)

    def _mark(self, message_id: int, size: int) -> None:
        with self._lock:
            self._oversized[message_id] = size


def limit_dataset_bytes(assoc: Association, limit: DatasetLimit) -> None:
    """Count the data-set bytes of each DIMSE message on ``assoc`` as they arrive, and stop buffering past the limit.

    The DUL hands each P-DATA primitive to ``assoc.dimse.receive_primitive`` (looked up on the instance, so it can
    be wrapped); a fragment's first byte is its message control header (PS3.8 E.2: bit 0 set for command
    fragments). Fragments are trimmed in place before pynetdicom copies them into its buffer.
    """
    dimse = assoc.dimse
    receive = dimse.receive_primitive
    received = 0  # data-set bytes of the message being received (one message at a time per association)

    def receive_primitive(primitive) -> None:  # noqa: ANN001 (pynetdicom's P_DATA)
        nonlocal received
        values = primitive.presentation_data_value_list
        for index, (context_id, data) in enumerate(values):
            if data[0] & 1:  # command fragment: a new message starts
                received = 0
                continue
            before = received
            received += len(data) - 1
            if received > limit.limit:
                keep = max(0, limit.head_bytes - before)
                values[index] = (context_id, data[: 1 + keep])
                if data[0] & 2:  # the last fragment: the handler learns the real size from the mark
                    message = dimse.message
                    message_id = getattr(getattr(message, "command_set", None), "MessageID", None)
                    if message_id is not None:
                        limit._mark(int(message_id), received)
        receive(primitive)

    dimse.receive_primitive = receive_primitive  # type: ignore[method-assign]


def encoded_dataset(dataset: object, file_meta: FileMetaDataset) -> bytes:
    """The received data set as a DICOM file (preamble, file meta, data set) in one copy, and its buffer freed.

    ``Event.encoded_dataset`` copies the buffer (``getvalue``) and then again when it joins the meta: two extra
    copies of what may be a 2 GB object. Joining the buffer's memory view makes one, and closing the buffer right
    after gives its memory back before the object is parsed.
    """
    view = dataset.getbuffer()  # type: ignore[attr-defined]
    try:
        data = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(file_meta), view))
    finally:
        view.release()
    dataset.close()  # type: ignore[attr-defined]
    return data

