"""The on-disk store of received instances, and the quarantine for what could not be accepted.

Received bytes are written as they came (no pixel decoding, no re-encoding) to
``incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Every UID is validated before it
becomes part of a path, so a hostile UID ("../../etc", "1.2/3", 200 characters) can never place a file outside
the store. Writes are atomic (a temporary file renamed into place) and durable: the file and its folder are
fsynced before :meth:`InstanceStore.store` returns, so what a sender is told Success for survives a crash of the
process or of the machine. The store is the truth the database is rebuilt from (:mod:`pacs_bridge.reconcile`);
each series folder keeps who sent it (``.sender.json``: calling and called AE title, peer, source) so a rebuilt row
routes as the original would have.

Anything that cannot be accepted goes to ``quarantine/`` with a JSON sidecar that says why: nothing that was
received is dropped.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
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


#: The sidecar in each series folder that says who sent the series (its first instance's sender).
SENDER_FILE = ".sender.json"


class InstanceStore:
    """Writes received instances under ``root/incoming`` and rejected input under ``root/quarantine``."""

    def __init__(self, incoming_dir: Path, quarantine_dir: Path, fsync: bool = True) -> None:
        self.incoming_dir = Path(incoming_dir).resolve()
        self.quarantine_dir = Path(quarantine_dir).resolve()
        #: fsync every file and folder written (off only for benchmarks of what it costs, or throw-away stores).
        self.fsync = fsync
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
              source: Path | None = None, sender: dict[str, str | None] | None = None,
              durable: bool = True) -> StoredInstance:
        """Write ``data`` (a complete DICOM file, preamble and meta included) for the given UIDs; when this returns,
        the file is durable (with ``durable=False`` only once the caller's next :meth:`sync` returns: a group
        commit for a writer that takes in many files before it records them).

        ``source``: a file on the store's filesystem that holds exactly ``data`` (a spool file); it is moved into
        place instead of writing the bytes again, and removed when the store already holds an identical copy.
        ``sender``: who sent it (calling_aet, called_aet, peer_address, source), kept once per series folder.
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
        self._make_series_folder(path.parent, sender)
        if source is not None:
            try:
                os.replace(source, path)  # atomic, and no second write of the bytes
                if self.fsync and durable:
                    _fsync_path(path)
                    _fsync_path(path.parent)
                return StoredInstance(path, len(data), digest, is_new=True, replaced=replaced)
            except OSError as exc:
                if exc.errno != errno.EXDEV:  # another filesystem: write the bytes instead
                    raise
        _atomic_write(path, data, self.fsync and durable)
        if source is not None:
            source.unlink(missing_ok=True)
        return StoredInstance(path, len(data), digest, is_new=True, replaced=replaced)

    def sync(self) -> None:
        """Make every write to the store's filesystem durable, in one call (``syncfs``): one flush for a batch
        costs far less than an fsync per file and per folder while other processes write to the same disk."""
        if not self.fsync:
            return
        descriptor = os.open(self.incoming_dir, os.O_RDONLY)
        try:
            if _LIBC.syncfs(descriptor) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"syncfs of {self.incoming_dir}: {os.strerror(code)}")
        finally:
            os.close(descriptor)

    def _make_series_folder(self, folder: Path, sender: dict[str, str | None] | None) -> None:
        if folder.is_dir():
            return
        folder.mkdir(parents=True, exist_ok=True)
        if sender:
            _atomic_write(folder / SENDER_FILE, json.dumps(sender).encode(), self.fsync)
        if self.fsync:  # the new folders' entries in their parents, or a crash may lose the whole series
            _fsync_path(folder.parent)
            _fsync_path(folder.parent.parent)

    def sender_of(self, folder: Path) -> dict[str, str | None]:
        """Who sent the series in ``folder`` (empty values where the folder does not say)."""
        try:
            sender = json.loads((folder / SENDER_FILE).read_text())
        except (OSError, ValueError):
            sender = {}
        return {key: (str(sender[key]) if sender.get(key) is not None else None)
                for key in ("calling_aet", "called_aet", "peer_address", "source")}

    def quarantine(self, data: bytes, reason: str, context: dict[str, object] | None = None) -> Path:
        """Keep rejected bytes with the reason beside them; returns the path of the kept bytes."""
        path = self._quarantine_path()
        _atomic_write(path, data, self.fsync)
        self._write_reason(path, reason, len(data), context)
        return path

    def quarantine_file(self, source: Path, reason: str, context: dict[str, object] | None = None) -> Path:
        """Move a stored file into quarantine with the reason beside it (an instance that could not be recorded)."""
        path = self._quarantine_path()
        size = source.stat().st_size
        try:
            os.replace(source, path)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _atomic_write(path, source.read_bytes(), self.fsync)
            source.unlink()
        self._write_reason(path, reason, size, {"stored_as": str(source), **(context or {})})
        return path

    def _quarantine_path(self) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        return self.quarantine_dir / f"{stamp}-{secrets.token_hex(4)}.dcm"

    def _write_reason(self, path: Path, reason: str, size: int, context: dict[str, object] | None) -> None:
        sidecar = {"reason": reason, "received_at": path.stem.split("-")[0], "size_bytes": size, **(context or {})}
        _atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=2, default=str).encode(), self.fsync)


def _sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


_LIBC = ctypes.CDLL(None, use_errno=True)

#: Temporary files of writes in progress start with this; one older than a write can take was left by a crash.
TEMPORARY_PREFIX = "."


def _atomic_write(path: Path, data: bytes, fsync: bool = True) -> None:
    tmp = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fdatasync(handle.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_path(path.parent)  # the rename itself
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
