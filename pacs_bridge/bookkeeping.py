"""Recording received instances and events in the database, in batches, without ever blocking the receiver.

The C-STORE handler only appends to an in-memory queue; a background thread writes what has accumulated in one
transaction (committing per row would cap ingest at the database's fsync rate). The files are already durable in
the store when a sender is told Success, and the store is reconciled with the database at start-up and
periodically (:mod:`pacs_bridge.reconcile`), so rows still queued when the process dies are recorded later.

No input can stop the writer: a batch the database refuses while it is reachable is split until the row it
refuses is found; that row is set aside (an instance's file goes to quarantine with the reason, an event is
logged) and the rest is written. While the database cannot be reached, the batch is kept and retried with a
bounded backoff, and :attr:`Bookkeeper.stall_s` tells the receivers to push back within seconds.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine

from pacs_bridge.intake import InstanceHeader
from pacs_bridge.routing import is_derived_object
from pacs_bridge.schema_fit import clean_json, clean_text, fit_text
from pacs_bridge.storage import StoredInstance
from sql.schema import events, instances, series, studies, utcnow

log = logging.getLogger(__name__)

#: How long the bookkeeper waits for more rows before it writes a batch that is still filling.
_FILL_STEP_S = 0.02
#: The longest wait between two tries while the database cannot be reached.
_MAX_BACKOFF_S = 5.0
#: While the database cannot be reached, the failure is logged again at most this often.
_LOG_EVERY_S = 30.0

#: A study in one of these states has been handed on; a new image re-opens it as a new version.
_DISPATCHED_STATES = ("queued", "processing", "done", "failed", "ignored", "not analysed")


@dataclass(frozen=True)
class ReceivedInstance:
    header: InstanceHeader
    stored: StoredInstance
    #: The sender's AE title (for C-MOVE and C-GET, the PACS's); None where there is no association (STOW-RS).
    calling_aet: str | None
    received_at: datetime = field(default_factory=utcnow)
    #: The AE title the sender addressed, the sender's IP address, and how the instance arrived (routing rules
    #: test these): c-store | stow-rs | c-get | wado-rs | reconcile.
    called_aet: str | None = None
    peer_address: str | None = None
    source: str = "c-store"


@dataclass(frozen=True)
class EventRecord:
    kind: str
    reason: str
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    detail: dict[str, Any] | None = None
    at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class SetAside:
    """A received instance that cannot be recorded as it is (its reason says why); its file goes to quarantine."""

    item: ReceivedInstance
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


class DatabaseUnavailable(Exception):
    """The database cannot take writes now (down, unreachable, locked, out of space): retry, do not split."""


#: Errors that say the database (not a row) is the problem. Anything else, while the database answers, is a row.
_TRANSIENT_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)

#: What the owner does with the file of an instance that was set aside: quarantine it (returns where it went).
QuarantineFile = Callable[[Path, str, dict[str, Any]], Path | None]


class Bookkeeper:
    """Batches :class:`ReceivedInstance` and :class:`EventRecord` rows into the database."""

    def __init__(self, engine: Engine, flush_interval_s: float = 0.2, max_batch: int = 500,
                 quarantine_file: QuarantineFile | None = None) -> None:
        self.engine = engine
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.quarantine_file = quarantine_file
        self._queue: queue.Queue[ReceivedInstance | EventRecord] = queue.Queue()
        self._pending: list[ReceivedInstance | EventRecord] = []
        self._stop = threading.Event()
        self._stop_deadline = float("inf")
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="bookkeeper", daemon=True)
        self.last_error: str | None = None
        self._failing_since: float | None = None
        self._logged_failure_at = float("-inf")
        #: Instances and events that could not be written as they were, and were set aside.
        self.set_aside = 0
        # How many items were added and how many are in the database: an item added as the n-th is recorded
        # once written >= n (the study assembler waits for a closed association's last images this way).
        self.added = 0
        self.written = 0
        self._count_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, for up to ``timeout`` seconds; what is left then is recorded by the next start's
        reconciliation (its files are in the store)."""
        self._stop_deadline = time.monotonic() + timeout
        self._stop.set()
        self._thread.join(timeout + 1.0)

    def add(self, item: ReceivedInstance | EventRecord) -> None:
        self._idle.clear()
        with self._count_lock:
            self.added += 1
            self._queue.put(item)

    def event(self, kind: str, reason: str, **kwargs: Any) -> None:
        self.add(EventRecord(kind=kind, reason=reason, **kwargs))

    @property
    def backlog(self) -> int:
        return self._queue.qsize() + len(self._pending)

    @property
    def stall_s(self) -> float:
        """For how long the database has not taken a write it was given (0 while writes go through)."""
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until everything added so far is written (for tests and orderly shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and not self._pending and self._idle.wait(0.05):
                return True
            time.sleep(0.02)
        return False

    def _run(self) -> None:
        backoff = self.flush_interval_s
        while not (self._stop.is_set() and self._queue.empty() and not self._pending):
            self._drain()
            if not self._pending:
                self._idle.set()
                self._stop.wait(self.flush_interval_s)
                continue
            # Let the batch fill while rows keep coming, for up to flush_interval_s: a write costs about as much
            # for one row as for hundreds, and writing whatever arrived during the previous write makes batches
            # of a few rows under load (0.23 ms per row at 20 rows a batch, 0.04 at 500, on SQLite here). When a
            # step brings nothing new the burst is over and the batch is written at once.
            deadline = time.monotonic() + self.flush_interval_s
            while (len(self._pending) < self.max_batch and time.monotonic() < deadline
                   and not self._stop.is_set()):
                before = len(self._pending)
                self._stop.wait(_FILL_STEP_S)
                self._drain()
                if len(self._pending) == before:
                    break
            try:
                while self._pending:
                    handled = self._write_prefix(self._pending)
                    with self._count_lock:
                        self.written += handled  # items are written in the order they were added
                    del self._pending[:handled]
            except DatabaseUnavailable as exc:
                self._note_failure(str(exc))
                if self._stop.is_set() and time.monotonic() >= self._stop_deadline:
                    left = len(self._pending) + self._queue.qsize()
                    log.error("stopping with %d bookkeeping row(s) not written (%s): the files are in the store "
                              "and are recorded by the reconciliation at the next start", left, self.last_error)
                    return
                # Sleep, not wait on the stop event: while stopping it is set and would make this a busy loop.
                time.sleep(min(backoff, max(0.05, self._stop_deadline - time.monotonic())))
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            if self._failing_since is not None:
                log.warning("bookkeeping resumed after %.1fs", self.stall_s)
            self.last_error, self._failing_since = None, None
            backoff = self.flush_interval_s

    def _note_failure(self, error: str) -> None:
        self.last_error = error
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._logged_failure_at >= _LOG_EVERY_S:
            self._logged_failure_at = now
            log.warning("bookkeeping: %d row(s) waiting, the database takes no writes for %.1fs: %s",
                        len(self._pending) + self._queue.qsize(), self.stall_s, error.splitlines()[0] if error else "")

    def _drain(self) -> None:
        while len(self._pending) < self.max_batch:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                break

    def _write_prefix(self, items: list[ReceivedInstance | EventRecord], retried: bool = False) -> int:
        """Write ``items`` or, when the database refuses them, the longest first part it takes; returns how many
        items were handled (written or set aside). Raises :class:`DatabaseUnavailable` when it cannot write."""
        try:
            with self.engine.begin() as connection:
                set_aside = write_batch(connection, items)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, _TRANSIENT_ERRORS) or getattr(exc, "connection_invalidated", False) \
                    or not self._database_reachable():
                raise DatabaseUnavailable(error) from exc
            if isinstance(exc, sa_exc.IntegrityError) and not retried:
                # Another writer (the API's STOW-RS, a scheduled reconciliation) inserted the same study, series
                # or instance between our read and our insert: the next try reads its row and goes on.
                time.sleep(0.05)
                return self._write_prefix(items, retried=True)
            if len(items) == 1:
                self._set_aside_unwritable(items[0], error)
                return 1
            # The database answers but refuses something in this batch: halve until the row is found.
            return self._write_prefix(items[:len(items) // 2], retried=retried)
        for aside in set_aside:
            self._quarantine(aside.item, aside.reason, aside.detail)
        return len(items)

    def _database_reachable(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            return False

    def _set_aside_unwritable(self, item: ReceivedInstance | EventRecord, error: str) -> None:
        self.set_aside += 1
        if isinstance(item, ReceivedInstance):
            self._quarantine(item, f"the database refused its row ({error.splitlines()[0][:500]})", {})
            return
        # An event the database refuses is kept in the log, and a plain note of it in the database.
        log.error("bookkeeping event set aside (%s): kind=%r study=%r reason=%r", error.splitlines()[0][:300],
                  clean_text(item.kind)[:32], clean_text(item.study_instance_uid)[:128], clean_text(item.reason)[:500])

    def _quarantine(self, item: ReceivedInstance, reason: str, detail: dict[str, Any]) -> None:
        header = item.header
        path = None
        if self.quarantine_file is not None:
            try:
                path = self.quarantine_file(item.stored.path, reason, {
                    "calling_aet": item.calling_aet, "peer": item.peer_address, "source": item.source,
                    "study_instance_uid": header.study_instance_uid, "sop_instance_uid": header.sop_instance_uid})
            except OSError as exc:
                reason = f"{reason}; moving it to quarantine failed: {exc}"
        log.warning("instance %s set aside: %s", header.sop_instance_uid, reason)
        self.add(EventRecord(kind="quarantine", reason=reason, study_instance_uid=header.study_instance_uid,
                             sop_instance_uid=header.sop_instance_uid,
                             detail={**detail, "path": str(path) if path else str(item.stored.path),
                                     "calling_aet": item.calling_aet, "source": item.source,
                                     "answered": "success"}))


def write_batch(connection: Connection, items: list[ReceivedInstance | EventRecord]) -> list[SetAside]:
    """Write a batch in the caller's transaction. Idempotent: re-writing the same instances changes nothing.

    Returns the instances set aside rather than recorded (their files are for the caller to quarantine): a SOP
    Instance UID already recorded in another series keeps the recorded copy, and this one is set aside with an
    event, so counts stay true and no file is orphaned.

    The work is set-based: one query each for the batch's known instances, studies and series, one multi-row
    insert for its new instances, and one count update per study and per series touched, whatever the batch
    size. Per-row statements cost about 2 ms of receiver CPU per image, which is most of an image's budget.
    """
    received = [item for item in items if isinstance(item, ReceivedInstance)]
    event_rows = [_event_row(item.at, item.kind, item.reason, item.study_instance_uid, item.sop_instance_uid,
                             item.detail)
                  for item in items if isinstance(item, EventRecord)]
    set_aside: list[SetAside] = []
    if received:
        event_rows.extend(_record_instances(connection, received, set_aside))
    if event_rows:
        connection.execute(insert(events), event_rows)
    return set_aside


def _event_row(at: datetime, kind: str, reason: str, study_uid: str | None, sop_uid: str | None,
               detail: dict[str, Any] | None) -> dict[str, Any]:
    """An events row whose every value fits its column (hostile UIDs and NULs arrive in quarantine events)."""
    return {
        "at": at, "kind": fit_text(kind, 32) or "event", "reason": clean_text(reason) or "-",
        "study_instance_uid": fit_text(study_uid, 128) or None, "sop_instance_uid": fit_text(sop_uid, 128) or None,
        "detail": clean_json(detail) if detail is not None else None,
    }


def _rows_by(connection: Connection, columns: list, key, values: set[str], from_=None) -> dict[str, Any]:
    """Rows whose ``key`` column is one of ``values``, by that value (in chunks: IN lists have limits)."""
    found: dict[str, Any] = {}
    ordered = sorted(values)
    for offset in range(0, len(ordered), _IN_CHUNK):
        chunk = ordered[offset:offset + _IN_CHUNK]
        query = select(key, *columns)
        if from_ is not None:
            query = query.select_from(from_)
        for row in connection.execute(query.where(key.in_(chunk))):
            found[row[0]] = row
    return found


#: How many values go into one ``IN (...)`` list (SQLite allows 32766 bound parameters; stay far below).
_IN_CHUNK = 500


def _record_instances(connection: Connection, batch: list[ReceivedInstance],
                      set_aside: list[SetAside]) -> list[dict[str, Any]]:
    """Record a batch of received instances; returns the event rows it gives rise to (re-opened studies, values
    changed to fit, duplicates set aside) and appends to ``set_aside`` what cannot be recorded."""
    known = _rows_by(connection, [instances.c.id, instances.c.sha256, series.c.series_instance_uid,
                                  studies.c.study_instance_uid],
                     instances.c.sop_instance_uid, {item.header.sop_instance_uid for item in batch},
                     from_=instances.join(series, instances.c.series_id == series.c.id)
                     .join(studies, series.c.study_id == studies.c.id))
    # A SOP Instance UID belongs to the series it was first recorded in (PS3.3 C.12.1.1.1: it identifies one
    # object). Another object under the same UID in another series or study is set aside with an event: moving
    # the row would orphan the first file and make both studies' counts wrong.
    owner: dict[str, tuple[str, str]] = {sop: (row.series_instance_uid, row.study_instance_uid)
                                         for sop, row in known.items()}
    events_out: list[dict[str, Any]] = []
    # The last copy of each SOP instance in the batch wins; a copy identical to what is recorded changes nothing
    # and re-triggers nothing.
    latest: dict[str, ReceivedInstance] = {}
    for item in batch:
        header = item.header
        sop_uid = header.sop_instance_uid
        first_series, first_study = owner.setdefault(sop_uid, (header.series_instance_uid,
                                                               header.study_instance_uid))
        if first_series != header.series_instance_uid:
            set_aside.append(SetAside(item, (
                f"SOP Instance UID {sop_uid} is already recorded in study {first_study} series {first_series}; "
                f"this other object with the same UID (study {header.study_instance_uid} series "
                f"{header.series_instance_uid}) was set aside, the recorded one kept"),
                {"kept_study_instance_uid": first_study, "kept_series_instance_uid": first_series,
                 "duplicate_uid": True}))
            continue
        if sop_uid in latest:
            current = latest[sop_uid].stored.sha256
        else:
            current = known[sop_uid].sha256 if sop_uid in known else None
        if current == item.stored.sha256:
            continue
        latest.pop(sop_uid, None)
        latest[sop_uid] = item
    changed = list(latest.values())
    if not changed:
        return events_out

    study_ids = _write_studies(connection, changed, events_out)
    series_ids = _write_series(connection, changed, study_ids)

    new_rows, added_per_series, added_per_study = [], Counter(), Counter()
    for item in changed:
        header, stored = item.header, item.stored
        row = {
            "series_id": series_ids[header.series_instance_uid], "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid, "transfer_syntax_uid": header.transfer_syntax_uid or None,
            "path": str(stored.path), "size_bytes": stored.size_bytes, "sha256": stored.sha256,
            "calling_aet": fit_text(item.calling_aet, 16) or None, "received_at": item.received_at,
        }
        previous = known.get(header.sop_instance_uid)
        if previous is None:
            new_rows.append(row)
            added_per_series[row["series_id"]] += 1
            added_per_study[study_ids[header.study_instance_uid]] += 1
        else:  # a changed copy replaces the recorded one; the counts stay
            connection.execute(update(instances).where(instances.c.id == previous.id).values(**row))
        if header.normalised:
            events_out.append(_event_row(
                item.received_at, "normalised",
                f"values changed to fit the database: {', '.join(sorted(header.normalised))} (the stored file "
                f"keeps them as received)", header.study_instance_uid, header.sop_instance_uid,
                {"changes": header.normalised}))
    if new_rows:
        connection.execute(insert(instances), new_rows)
    for series_id, added in added_per_series.items():
        connection.execute(update(series).where(series.c.id == series_id)
                           .values(instance_count=series.c.instance_count + added))
    for study_id, added in added_per_study.items():
        connection.execute(update(studies).where(studies.c.id == study_id)
                           .values(instance_count=studies.c.instance_count + added))
    return events_out


def _modalities(values: set[str]) -> str | None:
    return fit_text("\\".join(sorted(values)), 64) or None


def _write_studies(connection: Connection, batch: list[ReceivedInstance], events_out: list) -> dict[str, int]:
    """Create or update the batch's studies; returns their ids by Study Instance UID."""
    known = _rows_by(connection, [studies.c.id, studies.c.status, studies.c.version, studies.c.modalities],
                     studies.c.study_instance_uid, {item.header.study_instance_uid for item in batch})
    by_study: dict[str, list[ReceivedInstance]] = {}
    for item in batch:
        by_study.setdefault(item.header.study_instance_uid, []).append(item)
    ids: dict[str, int] = {}
    for study_uid, arrived in by_study.items():
        first, last_at = arrived[0], max(item.received_at for item in arrived)
        arrived_modalities = {item.header.modality for item in arrived if item.header.modality}
        row = known.get(study_uid)
        if row is None:
            attrs = first.header.study_attributes
            ids[study_uid] = connection.execute(
                insert(studies).values(
                    study_instance_uid=study_uid,
                    accession_number=attrs.get("AccessionNumber") or None,
                    study_description=attrs.get("StudyDescription") or None,
                    patient_sex=attrs.get("PatientSex") or None,
                    patient_age=attrs.get("PatientAge") or None,
                    study_date=attrs.get("StudyDate") or None,
                    modalities=_modalities(arrived_modalities),
                    calling_aet=fit_text(first.calling_aet, 16) or None,
                    status="receiving",
                    version=1,
                    instance_count=0,
                    first_received_at=first.received_at,
                    last_received_at=last_at,
                )
            ).inserted_primary_key[0]
            continue
        ids[study_uid] = row.id
        values: dict[str, Any] = {"last_received_at": last_at}
        modalities = set(filter(None, (row.modalities or "").split("\\")))
        if not arrived_modalities <= modalities:
            values["modalities"] = _modalities(modalities | arrived_modalities)
        # An SR of ours (or any derived object) stored into a processed study must not re-open it: that would
        # process the study again and send another SR, a loop. Late images re-open it (once) as a new version,
        # processed again into a revised SR.
        trigger = next((item for item in arrived
                        if not is_derived_object(item.header.modality, item.header.sop_class_uid)), None)
        if row.status in _DISPATCHED_STATES and trigger is not None:
            values.update(status="receiving", version=row.version + 1, first_received_at=trigger.received_at)
            events_out.append(_event_row(
                trigger.received_at, "reopened",
                f"new instance after the study was {row.status}: version {row.version + 1}",
                study_uid, trigger.header.sop_instance_uid, None))
        connection.execute(update(studies).where(studies.c.id == row.id).values(**values))
    return ids


def _write_series(connection: Connection, batch: list[ReceivedInstance], study_ids: dict[str, int]) -> dict[str, int]:
    """Create the batch's new series; returns the ids of all its series by Series Instance UID."""
    known = _rows_by(connection, [series.c.id], series.c.series_instance_uid,
                     {item.header.series_instance_uid for item in batch})
    ids = {uid: row.id for uid, row in known.items()}
    for item in batch:
        header = item.header
        if header.series_instance_uid in ids:
            continue
        ids[header.series_instance_uid] = connection.execute(
            insert(series).values(
                study_id=study_ids[header.study_instance_uid], series_instance_uid=header.series_instance_uid,
                modality=header.modality or None, series_description=header.series_description or None,
                series_number=header.series_number, instance_count=0,
                calling_aet=fit_text(item.calling_aet, 16) or None, called_aet=fit_text(item.called_aet, 16) or None,
                peer_address=fit_text(item.peer_address, 64) or None, source=fit_text(item.source, 16) or None,
            )
        ).inserted_primary_key[0]
    return ids
