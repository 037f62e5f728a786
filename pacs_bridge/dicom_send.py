"""Sending objects to a DICOM destination by C-STORE (pynetdicom SCU)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from pacs_bridge import association
from pacs_bridge.dicom_tls import TlsFiles


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
    """Send ``datasets`` to ``destination``, each acknowledged once; raise :class:`DeliveryError` naming the first
    failure. An answer that goes missing is resent on a new association (:func:`pacs_bridge.association.c_store`)."""
    loaded = [pydicom.dcmread(d) if isinstance(d, (str, Path)) else d for d in datasets]
    association.c_store(destination, loaded, calling_aet=calling_aet, timeout_s=timeout_s, error=DeliveryError)
