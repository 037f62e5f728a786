"""Talking to a DICOM peer as the requestor (SCU): one way to associate, one C-STORE sender, one query runner.

Every outbound DIMSE path (the demo, SR delivery, forwarding, pull's C-FIND/C-MOVE/C-GET) goes through here, so
TLS, timeouts, error messages naming the peer, and what happens when a response goes missing are decided once.

A response can go missing without the peer being at fault: pynetdicom's reactor thread can take it (see
:mod:`pacs_bridge.pynetdicom_requestor`, whose gate every association made here gets), or the connection drops.
The object or request was then probably handled by the peer; only its answer is gone. So on a missing response
(DIMSE timeout, association aborted, a response without a status) the association is aborted, a new one is made
and what was not acknowledged is sent again; storing an instance again is harmless (a PACS keeps one copy per SOP
Instance UID) and so is repeating a query or a retrieve. This is bounded: after ``attempts`` associations in a row
that lose an answer without acknowledging anything new, the caller's error names the peer and what is still
unacknowledged. A failure *status* is an answer, not a loss, and is never resent here.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association

from pacs_bridge import pynetdicom_requestor
from pacs_bridge.dicom_tls import TlsFiles, client_context
from pacs_bridge.intake import STATUS_SUCCESS

log = logging.getLogger(__name__)

#: Associations in a row that may lose an answer before the caller is told (each one that acknowledges at least
#: one more object starts the count again, so a long study is never given up while it makes progress).
ATTEMPTS = 3
#: A DICOM association negotiates at most 128 presentation contexts (PS3.8 9.3.2.2).
MAX_CONTEXTS = 128
#: Connecting (TCP and TLS) never waits longer than this, whatever the DIMSE timeout.
CONNECT_TIMEOUT_S = 10.0

#: A requested presentation context: an abstract syntax alone, or with the transfer syntaxes proposed for it.
Context = str | tuple[str, str | list[str]]
Responses = Iterable[tuple[Dataset, Dataset | None]]


class DicomPeer(Protocol):
    """What is needed to reach a peer: a destination (:class:`~pacs_bridge.dicom_send.DicomDestination`) or a pull
    source (:class:`~pacs_bridge.pull.DimseSource`)."""

    name: str
    host: str
    port: int
    ae_title: str
    tls: TlsFiles | None


class AssociationError(Exception):
    """A peer that could not be reached or did not answer (callers pass their own subclass of Exception)."""


def describe(peer: DicomPeer) -> str:
    return f"{peer.ae_title}@{peer.host}:{peer.port}"


def associate(peer: DicomPeer, calling_aet: str, contexts: Sequence[Context], *, timeout_s: float,
              dimse_timeout_s: float | None = None, error: type[Exception] = AssociationError, hint: str = "",
              **kwargs) -> Association:
    """An established association with ``peer`` (TLS when it has ``tls``), or ``error`` saying why not.

    ``timeout_s`` bounds association negotiation and network silence, ``dimse_timeout_s`` (default ``timeout_s``)
    the wait for each response. ``kwargs`` go to :meth:`pynetdicom.AE.associate` (``ext_neg``, ``evt_handlers``).
    """
    if len(contexts) > MAX_CONTEXTS:
        raise error(f"{peer.name}: {len(contexts)} presentation contexts are needed, more than one association can "
                    f"negotiate ({MAX_CONTEXTS})")
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.network_timeout = timeout_s
    ae.dimse_timeout = timeout_s if dimse_timeout_s is None else dimse_timeout_s
    ae.connection_timeout = min(timeout_s, CONNECT_TIMEOUT_S)
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    tls_args = (client_context(peer.tls), peer.tls.server_name or peer.host) if peer.tls is not None else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args, **kwargs)
    if not assoc.is_established:
        raise error(f"{peer.name}: association with {describe(peer)} as {calling_aet} was not established "
                    f"({'rejected' if assoc.is_rejected else 'no answer'}){hint}")
    pynetdicom_requestor.send_without_delay(assoc)
    return pynetdicom_requestor.install_reactor_gate(assoc)


@contextmanager
def associated(peer: DicomPeer, calling_aet: str, contexts: Sequence[Context], **kwargs) -> Iterator[Association]:
    """:func:`associate`, released on the way out (or already aborted, when an answer went missing)."""
    assoc = associate(peer, calling_aet, contexts, **kwargs)
    try:
        yield assoc
    finally:
        _close(assoc)


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    if assoc.is_established:  # the peer never answered the release request
        assoc.abort()


def _answered(status: Dataset | None) -> int | None:
    """The response's status code; None when no response came (timeout, abort) or it carried no status."""
    return getattr(status, "Status", None) if status is not None else None


def _label(item: Dataset | Path) -> str:
    return str(item.SOPInstanceUID) if isinstance(item, Dataset) else str(item)


def storage_contexts(items: Sequence[Dataset | Path]) -> list[Context]:
    """One presentation context per (SOP Class, transfer syntax) among ``items`` (files: header only)."""
    found = set()
    for item in items:
        header = item if isinstance(item, Dataset) else pydicom.dcmread(item, stop_before_pixels=True)
        found.add((str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID)))
    return sorted(found)


def c_store(peer: DicomPeer, items: Sequence[Dataset | Path], *, calling_aet: str, timeout_s: float,
            error: type[Exception] = AssociationError, attempts: int = ATTEMPTS) -> int:
    """Store every item (a dataset, or a file sent as it is) at ``peer``; returns the associations used.

    Each item is acknowledged once. A failure status raises ``error`` naming the item; a missing answer aborts,
    re-associates and resends from the first unacknowledged item (see the module's docstring for the bound).
    """
    contexts = storage_contexts(items)
    acknowledged = 0
    associations = lost_in_a_row = 0
    while acknowledged < len(items):
        associations += 1
        progress_before = acknowledged
        with associated(peer, calling_aet, contexts, timeout_s=timeout_s, error=error) as assoc:
            for item in items[acknowledged:]:
                code = _answered(assoc.send_c_store(item)) if assoc.is_established else None
                if code is None:
                    break
                if code != STATUS_SUCCESS and not 0xB000 <= code <= 0xBFFF:  # Bxxx = stored with a warning
                    raise error(f"{peer.name}: C-STORE of {_label(item)} failed, status 0x{code:04X}")
                acknowledged += 1
        if acknowledged == len(items):
            break
        lost_in_a_row = 1 if acknowledged > progress_before else lost_in_a_row + 1
        missing = len(items) - acknowledged
        if lost_in_a_row >= attempts:
            raise error(f"{peer.name}: no response to C-STORE of {_label(items[acknowledged])} from {describe(peer)}; "
                        f"{missing} of {len(items)} object(s) not acknowledged after {associations} association(s)")
        log.warning("%s: no response to C-STORE of %s; resending %d unacknowledged object(s) on a new association",
                    peer.name, _label(items[acknowledged]), missing)
    return associations


def request(peer: DicomPeer, calling_aet: str, contexts: Sequence[Context],
            send: Callable[[Association], Responses], *, what: str, timeout_s: float,
            dimse_timeout_s: float | None = None, error: type[Exception] = AssociationError,
            attempts: int = ATTEMPTS, hint: str = "", **kwargs) -> list[tuple[Dataset, Dataset | None]]:
    """Run one C-FIND, C-MOVE or C-GET (``send`` issues it on the association) to its final response.

    Returns every (status, identifier) response, the final one last. If the responses stop before a final status
    (timeout, abort), the partial answer is dropped and the request is sent again on a new association.
    """
    for attempt in range(1, attempts + 1):
        responses: list[tuple[Dataset, Dataset | None]] = []
        with associated(peer, calling_aet, contexts, timeout_s=timeout_s, dimse_timeout_s=dimse_timeout_s,
                        error=error, hint=hint, **kwargs) as assoc:
            for status, identifier in send(assoc):
                if _answered(status) is None:
                    break
                responses.append((status, identifier))
                if status.Status not in (0xFF00, 0xFF01):  # anything but Pending is final
                    return responses
        if attempt < attempts:
            log.warning("%s: %s got no final response; sending it again on a new association", peer.name, what)
    raise error(f"{peer.name}: {what} timed out or the association was aborted ({attempts} association(s) with "
                f"{describe(peer)})")
