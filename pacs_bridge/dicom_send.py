"""Sending objects to a DICOM destination by C-STORE (pynetdicom SCU)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

from pacs_bridge.dicom_tls import TlsFiles, client_context
from pacs_bridge.intake import STATUS_SUCCESS


@dataclass(frozen=True)
class DicomDestination:
    name: str
    host: str
    port: int
    ae_title: str
    #: DICOM TLS to this destination; None: plain TCP.
    tls: TlsFiles | None = None


class DeliveryError(Exception):
    """A C-STORE that did not succeed: the peer was unreachable, refused the association or returned a failure."""


def c_store(destination: DicomDestination, datasets: list[Dataset | Path], calling_aet: str = "TRIAGE",
            timeout_s: float = 30.0) -> None:
    """Send ``datasets`` on one association; raise :class:`DeliveryError` naming the first failure."""
    loaded = [pydicom.dcmread(d) if isinstance(d, (str, Path)) else d for d in datasets]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10.0)
    for sop_class, syntax in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in loaded}:
        ae.add_requested_context(sop_class, syntax)
    tls_args = None
    if destination.tls is not None:
        tls_args = (client_context(destination.tls), destination.tls.server_name or destination.host)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        raise DeliveryError(f"{destination.name}: association with {destination.ae_title}@"
                            f"{destination.host}:{destination.port} was not established "
                            f"({'rejected' if assoc.is_rejected else 'no answer'})")
    try:
        for ds in loaded:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise DeliveryError(f"{destination.name}: no response to C-STORE of {ds.SOPInstanceUID}")
            if code != STATUS_SUCCESS and not 0xB000 <= code <= 0xBFFF:  # Bxxx = stored with a warning
                raise DeliveryError(f"{destination.name}: C-STORE of {ds.SOPInstanceUID} failed, status 0x{code:04X}")
    finally:
        assoc.release()


def c_store_with_retries(destination: DicomDestination, datasets: list[Dataset | Path], *, attempts: int = 3,
                         backoff_s: float = 2.0, calling_aet: str = "TRIAGE") -> int:
    """:func:`c_store` with exponential backoff; returns the number of attempts used, raises after the last."""
    for attempt in range(1, attempts + 1):
        try:
            c_store(destination, datasets, calling_aet=calling_aet)
            return attempt
        except (DeliveryError, OSError) as exc:
            if attempt == attempts:
                raise DeliveryError(f"{exc} (after {attempts} attempts)") from exc
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
