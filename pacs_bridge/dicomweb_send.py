"""Sending objects to a DICOMweb destination by STOW-RS (dicomweb-client)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from pacs_bridge.dicom_send import DeliveryError


@dataclass(frozen=True)
class DicomwebDestination:
    name: str
    url: str  # the DICOMweb base URL, e.g. http://pacs:8042/dicom-web
    timeout_s: float = 30.0


def stow_rs(destination: DicomwebDestination, datasets: list[Dataset | Path]) -> None:
    """Store ``datasets`` with one STOW-RS request; raise :class:`DeliveryError` unless every one was stored.

    Orthanc answers success with an *empty* FailedSOPSequence, so its length is checked, not its presence.
    """
    from dicomweb_client.api import DICOMwebClient

    loaded = [pydicom.dcmread(d) if isinstance(d, (str, Path)) else d for d in datasets]
    client = DICOMwebClient(url=destination.url)
    client.set_http_retry_params(retry=False)
    try:
        response = client.store_instances(datasets=loaded)
    except Exception as exc:  # requests' ConnectionError, HTTPError, timeouts
        raise DeliveryError(f"{destination.name}: STOW-RS to {destination.url} failed: {exc}") from exc
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed is not None and len(failed) > 0:
        reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')} (0x{int(item.get('FailureReason', 0)):04X})"
                            for item in failed)
        raise DeliveryError(f"{destination.name}: STOW-RS refused {len(failed)} instance(s): {reasons}")
