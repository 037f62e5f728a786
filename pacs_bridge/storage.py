"""The on-disk store of received instances, and the quarantine for what could not be accepted.

Received bytes are written as they came (no pixel decoding, no re-encoding) to
``incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Every UID is validated before it
becomes part of a path, so a hostile UID ("../../etc", "1.2/3", 200 characters) can never place a file outside
the store. Writes are atomic (temporary file, fsync-free rename), so a crash never leaves a half-written
instance under its final name.

Anything that cannot be accepted goes to ``quarantine/`` with a JSON sidecar that says why: nothing that was
received is dropped.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

#: PS3.5 §9.1: components of digits separated by periods, at most 64 characters, no leading zero in a
#: multi-digit component.
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID (and so must never become a path)."""


def validate_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidUID` naming the attribute and the value."""
    text = str(value) if value is not None else ""
    # Trailing NUL padding is legal on the wire for UI values.
    text = text.rstrip("\x00").strip()
    if not text:
        raise InvalidUID(f"{name} is missing or empty")
    if len(text) > 64:
        raise InvalidUID(f"{name} {text[:80]!r} is longer than 64 characters")
    if not _UID_PATTERN.match(text):
        raise InvalidUID(f"{name} {text[:80]!r} is not a valid DICOM UID")
    return text


@dataclass(frozen=True)
class StoredInstance:
    path: Path
    size_bytes: int
    sha256: str
    #: False when an identical copy was already in the store (a re-sent instance).
    is_new: bool
    #: True when a different object with the same SOP Instance UID was replaced.
    replaced: bool


class InstanceStore:
    """Writes received instances under ``root/incoming`` and rejected input under ``root/quarantine``."""

    def __init__(self, incoming_dir: Path, quarantine_dir: Path) -> None:
        self.incoming_dir = Path(incoming_dir).resolve()
        self.quarantine_dir = Path(quarantine_dir).resolve()
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        parts = [
            validate_uid(study_uid, "StudyInstanceUID"),
            validate_uid(series_uid, "SeriesInstanceUID"),
            validate_uid(sop_uid, "SOPInstanceUID"),
        ]
        path = self.incoming_dir / parts[0] / parts[1] / f"{parts[2]}.dcm"
        # Belt and braces: the UID grammar already excludes separators and dots-only components. A string check
        # (no filesystem calls: this runs once per received image) that the normalised path stays in the store.
        if not os.path.normpath(path).startswith(f"{self.incoming_dir}{os.sep}"):
            raise InvalidUID(f"path {path} would leave the store {self.incoming_dir}")
        return path

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes,
              source: Path | None = None) -> StoredInstance:
        """Write ``data`` (a complete DICOM file, preamble and meta included) for the given UIDs.

        ``source``: a file on the store's filesystem that holds exactly ``data`` (a spool file); it is moved into
        place instead of writing the bytes again, and removed when the store already holds an identical copy.
        """
        path = self.path_for(study_uid, series_uid, sop_uid)
        digest = hashlib.sha256(data).hexdigest()
        replaced = False
        if path.exists():
            if path.stat().st_size == len(data) and _sha256_of(path) == digest:
                if source is not None:
                    source.unlink(missing_ok=True)
                return StoredInstance(path, len(data), digest, is_new=False, replaced=False)
            replaced = True
        path.parent.mkdir(parents=True, exist_ok=True)
        if source is not None:
            try:
                os.replace(source, path)  # atomic, and no second write of the bytes
                return StoredInstance(path, len(data), digest, is_new=True, replaced=replaced)
            except OSError as exc:
                if exc.errno != errno.EXDEV:  # another filesystem: write the bytes instead
                    raise
        _atomic_write(path, data)
        if source is not None:
            source.unlink(missing_ok=True)
        return StoredInstance(path, len(data), digest, is_new=True, replaced=replaced)

    def quarantine(self, data: bytes, reason: str, context: dict[str, object] | None = None) -> Path:
        """Keep rejected bytes with the reason beside them; returns the path of the kept bytes."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        stem = f"{stamp}-{secrets.token_hex(4)}"
        path = self.quarantine_dir / f"{stem}.dcm"
        _atomic_write(path, data)
        sidecar = {"reason": reason, "received_at": stamp, "size_bytes": len(data), **(context or {})}
        _atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=2, default=str).encode())
        return path


def _sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
