"""Sending files to a destination: the one sender of SR deliveries and forwarded images.

A DICOM destination gets the files by C-STORE, as they are, on associations of :mod:`pacs_bridge.association`
(TLS, timeouts, and resending what a lost answer left unacknowledged are decided there); a DICOMweb
destination by STOW-RS in bounded batches, so a study of thousands of images never has to fit in memory.
Failures raise :class:`~pacs_bridge.dicom_send.DeliveryError` naming the destination; retrying is the caller's
(a Celery task with a declared policy, :mod:`worker.delivery`), never a loop here.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom

from pacs_bridge import association
from pacs_bridge.dicom_send import DeliveryError, DicomDestination
from pacs_bridge.dicomweb_send import DicomwebDestination, stow_rs

Destination = DicomDestination | DicomwebDestination

#: Instances per STOW-RS request (bounded memory, bounded request size).
STOW_BATCH = 50
#: How long one association waits for its negotiation, for each response, and through network silence.
SEND_TIMEOUT_S = 60.0


def send_files(destination: Destination, paths: Sequence[Path], calling_aet: str,
               timeout_s: float = SEND_TIMEOUT_S) -> None:
    """Send ``paths`` as they are, each acknowledged; raise :class:`DeliveryError` naming the first failure
    (or a file that is no longer there)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DeliveryError(f"{destination.name}: {len(missing)} file(s) to send are no longer in the store, "
                            f"e.g. {missing[0]}")
    if isinstance(destination, DicomwebDestination):
        for start in range(0, len(paths), STOW_BATCH):
            stow_rs(destination, [pydicom.dcmread(p) for p in paths[start:start + STOW_BATCH]])
        return
    association.c_store(destination, [Path(p) for p in paths], calling_aet=calling_aet, timeout_s=timeout_s,
                        error=DeliveryError)
