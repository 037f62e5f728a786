"""Reconciling the store with the database: every file in the store is recorded, or quarantined with its reason.

A sender is told Success once its object is durable in the store (:mod:`pacs_bridge.storage`); its row reaches
the database a moment later, through the bookkeeper's queue. A process killed in between, a database that was down
when the process stopped, or a row the bookkeeper could not write leaves a file without a row. The reconciler
walks the store and takes each such file in through the same checks as a C-STORE (:func:`check_received`), with
the sender its series folder names, so the study completes and is processed as if nothing had happened.

It runs in full when ``triage serve`` starts (before the study assembler may complete anything) and then
periodically over the series folders changed since its last pass (a file renamed into a folder updates the
folder's modification time). Files younger than ``grace_s`` are left to the bookkeeper that is still writing them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Engine

from pacs_bridge.bookkeeping import Bookkeeper, ReceivedInstance
from pacs_bridge.intake import RejectedInstance, check_received
from pacs_bridge.scp import ActiveStudies
from pacs_bridge.storage import TEMPORARY_PREFIX, InstanceStore, StoredInstance
from sql.schema import instances, series, studies

log = logging.getLogger(__name__)

#: A temporary file this old was left by a write that never finished (a crash): nobody was told Success for it.
STALE_TEMPORARY_S = 3600.0
#: The key under which the reconciler's studies are held active until their rows are written.
_RECONCILING = -1


@dataclass
class ReconcileReport:
    """What one pass found."""

    files_scanned: int = 0
    #: Files that had no row, queued for the database.
    recorded: int = 0
    #: Files that failed the intake checks now, moved to quarantine with the reason.
    quarantined: int = 0
    temporaries_removed: int = 0
    studies: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, object]:
        return {"files_scanned": self.files_scanned, "recorded": self.recorded, "quarantined": self.quarantined,
                "temporaries_removed": self.temporaries_removed, "studies": len(self.studies)}


class StoreReconciler:
    def __init__(self, engine: Engine, store: InstanceStore, bookkeeper: Bookkeeper, grace_s: float = 120.0) -> None:
        self.engine = engine
        self.store = store
        self.bookkeeper = bookkeeper
        self.grace_s = grace_s
        #: Studies with files queued by a pass and not yet written: the assembler must not complete them early.
        self.active = ActiveStudies(written=lambda: bookkeeper.written, added=lambda: bookkeeper.added)
        self._last_pass_started: float | None = None

    def run(self, full: bool = False) -> ReconcileReport:
        """One pass; ``full`` looks at every folder and every file, however recent (at start-up)."""
        started = time.time()
        since = None if full or self._last_pass_started is None else self._last_pass_started - self.grace_s
        newest = None if full else started - self.grace_s
        report = ReconcileReport()
        try:
            for study_dir in _folders(self.store.incoming_dir):
                series_dirs = [folder for folder in _folders(study_dir)
                               if since is None or _mtime(folder) >= since]
                if series_dirs:
                    self._reconcile_study(study_dir, series_dirs, newest, report)
        finally:
            self.active.close(_RECONCILING)
        self._last_pass_started = started
        if report.recorded or report.quarantined:
            log.warning("reconciliation: %d file(s) in the store had no row and were queued for the database, %d "
                        "quarantined, in %d study(ies)", report.recorded, report.quarantined, len(report.studies))
            self.bookkeeper.event("reconciled",
                                  f"{report.recorded} stored file(s) without a row recorded, {report.quarantined} "
                                  f"quarantined ({'full pass' if full else 'changed folders'})",
                                  detail=report.as_dict())
        return report

    def _reconcile_study(self, study_dir: Path, series_dirs: list[Path], newest: float | None,
                         report: ReconcileReport) -> None:
        recorded = self._recorded_paths(study_dir.name)
        now = time.time()
        for series_dir in series_dirs:
            for entry in os.scandir(series_dir):
                name = entry.name
                if name.startswith(TEMPORARY_PREFIX):
                    if name.endswith(".tmp") and _entry_mtime(entry) < now - STALE_TEMPORARY_S:
                        Path(entry.path).unlink(missing_ok=True)
                        report.temporaries_removed += 1
                    continue
                if not name.endswith(".dcm") or not entry.is_file():
                    continue
                report.files_scanned += 1
                if entry.path in recorded:
                    continue
                modified = _entry_mtime(entry)
                if newest is not None and modified > newest:
                    continue  # the bookkeeper may still be writing its row
                self._take_in(Path(entry.path), modified, report)

    def _recorded_paths(self, study_uid: str) -> set[str]:
        query = (select(instances.c.path)
                 .select_from(instances.join(series, instances.c.series_id == series.c.id)
                              .join(studies, series.c.study_id == studies.c.id))
                 .where(studies.c.study_instance_uid == study_uid))
        with self.engine.connect() as connection:
            return set(connection.execute(query).scalars())

    def _take_in(self, path: Path, modified: float, report: ReconcileReport) -> None:
        series_dir = path.parent
        study_uid, series_uid, sop_uid = series_dir.parent.name, series_dir.name, path.name[:-len(".dcm")]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return  # quarantined or replaced meanwhile
        try:
            header = check_received(data)
            if (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid) != \
                    (study_uid, series_uid, sop_uid):
                raise RejectedInstance(
                    f"the file's UIDs (study {header.study_instance_uid}, series {header.series_instance_uid}, "
                    f"instance {header.sop_instance_uid}) are not those of its place in the store")
        except RejectedInstance as exc:
            self._quarantine(path, exc.reason, study_uid, sop_uid)
            report.quarantined += 1
            return
        sender = self.store.sender_of(series_dir)
        stored = StoredInstance(path, len(data), hashlib.sha256(data).hexdigest(), is_new=True, replaced=False)
        self.active.add(_RECONCILING, study_uid)
        self.bookkeeper.add(ReceivedInstance(
            header=header, stored=stored, calling_aet=sender["calling_aet"], called_aet=sender["called_aet"],
            peer_address=sender["peer_address"], source=sender["source"] or "reconcile",
            received_at=datetime.fromtimestamp(modified, UTC)))
        report.recorded += 1
        report.studies.add(study_uid)

    def _quarantine(self, path: Path, reason: str, study_uid: str, sop_uid: str) -> None:
        kept = None
        try:
            kept = self.store.quarantine_file(path, reason, {"source": "reconcile", "answered": "success"})
        except OSError as exc:
            reason = f"{reason}; moving it to quarantine failed: {exc}"
        log.warning("reconciliation: %s set aside: %s", path, reason)
        self.bookkeeper.event("quarantine", reason, study_instance_uid=study_uid, sop_instance_uid=sop_uid,
                              detail={"source": "reconcile", "path": str(kept) if kept else str(path)})


def _folders(parent: Path) -> list[Path]:
    try:
        return sorted(Path(entry.path) for entry in os.scandir(parent)
                      if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."))
    except FileNotFoundError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _entry_mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return float("inf")


def reconcile_store(engine: Engine, incoming_dir: Path, quarantine_dir: Path, *, full: bool = False,
                    grace_s: float = 120.0, fsync: bool = True, timeout_s: float = 600.0) -> ReconcileReport:
    """One pass from outside the receiving service (a scheduled task, an operator): with a bookkeeper of its own,
    written out before it returns. ``full`` also takes files younger than ``grace_s``: use it only while no
    receiver is writing into the store."""
    store = InstanceStore(incoming_dir, quarantine_dir, fsync=fsync)
    bookkeeper = Bookkeeper(engine, quarantine_file=store.quarantine_file)
    bookkeeper.start()
    try:
        report = StoreReconciler(engine, store, bookkeeper, grace_s=grace_s).run(full=full)
        if not bookkeeper.wait_idle(timeout_s):
            raise TimeoutError(f"reconciliation: rows not written within {timeout_s:.0f}s ({bookkeeper.last_error})")
        return report
    finally:
        bookkeeper.stop()
