"""Recording received instances and events in the database, in batches, without ever blocking the receiver.

The C-STORE handler only appends to an in-memory queue; a background thread writes what has accumulated in one
transaction (committing per row would cap ingest at the database's fsync rate). If the database is unreachable,
the batch is kept and retried with backoff while the SCP goes on receiving: the files are already safe on disk,
so a database outage delays bookkeeping and completion, and loses nothing.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine

from pacs_bridge.intake import InstanceHeader
from pacs_bridge.routing import is_derived_object
from pacs_bridge.schema import events, instances, series, studies, utcnow
from pacs_bridge.storage import StoredInstance

log = logging.getLogger(__name__)

#: How long the bookkeeper waits for more rows before it writes a batch that is still filling.
_FILL_STEP_S = 0.02

#: A study in one of these states has been handed on; a new image re-opens it as a new version.
_DISPATCHED_STATES = ("queued", "processing", "done", "failed", "ignored")


@dataclass(frozen=True)
class ReceivedInstance:
    header: InstanceHeader
    stored: StoredInstance
    #: The sender's AE title (for C-MOVE and C-GET, the PACS's); None where there is no association (STOW-RS).
    calling_aet: str | None
    received_at: datetime = field(default_factory=utcnow)
    #: The AE title the sender addressed, the sender's IP address, and how the instance arrived (routing rules
    #: test these): c-store | stow-rs | c-get | wado-rs.
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


class Bookkeeper:
    """Batches :class:`ReceivedInstance` and :class:`EventRecord` rows into the database."""

    def __init__(self, engine: Engine, flush_interval_s: float = 0.2, max_batch: int = 500) -> None:
        self.engine = engine
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self._queue: queue.Queue[ReceivedInstance | EventRecord] = queue.Queue()
        self._pending: list[ReceivedInstance | EventRecord] = []
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="bookkeeper", daemon=True)
        self.last_error: str | None = None
        # How many items were added and how many are in the database: an item added as the n-th is recorded
        # once written >= n (the study assembler waits for a closed association's last images this way).
        self.added = 0
        self.written = 0
        self._count_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

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
                time.sleep(self.flush_interval_s)
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
                with self.engine.begin() as connection:
                    write_batch(connection, self._pending)
            except Exception as exc:  # the database is down or refused the batch: keep it and retry
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("bookkeeping batch of %d not written, retrying in %.1fs: %s",
                            len(self._pending), backoff, self.last_error.splitlines()[0])
                if self._stop.wait(backoff) and self._stop.is_set():
                    backoff = 0.5
                backoff = min(backoff * 2, 10.0)
                continue
            self.last_error = None
            backoff = self.flush_interval_s
            self.written += len(self._pending)  # items are written in the order they were added
            self._pending.clear()

    def _drain(self) -> None:
        while len(self._pending) < self.max_batch:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                break


def write_batch(connection: Connection, items: list[ReceivedInstance | EventRecord]) -> None:
    """Write a batch in the caller's transaction. Idempotent: re-writing the same instances changes nothing.

    The work is set-based: one query each for the batch's known instances, studies and series, one multi-row
    insert for its new instances, and one count update per study and per series touched, whatever the batch
    size. Per-row statements cost about 2 ms of receiver CPU per image, which is most of an image's budget.
    """
    received = [item for item in items if isinstance(item, ReceivedInstance)]
    event_rows = [
        {
            "at": item.at, "kind": item.kind, "reason": item.reason, "study_instance_uid": item.study_instance_uid,
            "sop_instance_uid": item.sop_instance_uid, "detail": item.detail,
        }
        for item in items if isinstance(item, EventRecord)
    ]
    if received:
        event_rows.extend(_record_instances(connection, received))
    if event_rows:
        connection.execute(insert(events), event_rows)


def _rows_by(connection: Connection, columns: list, key, values: set[str]) -> dict[str, Any]:
    """Rows whose ``key`` column is one of ``values``, by that value (in chunks: IN lists have limits)."""
    found: dict[str, Any] = {}
    ordered = sorted(values)
    for offset in range(0, len(ordered), _IN_CHUNK):
        chunk = ordered[offset:offset + _IN_CHUNK]
        for row in connection.execute(select(key, *columns).where(key.in_(chunk))):
            found[row[0]] = row
    return found


#: How many values go into one ``IN (...)`` list (SQLite allows 32766 bound parameters; stay far below).
_IN_CHUNK = 500


def _record_instances(connection: Connection, batch: list[ReceivedInstance]) -> list[dict[str, Any]]:
    """Record a batch of received instances; returns the event rows it gives rise to (re-opened studies)."""
    known = _rows_by(connection, [instances.c.id, instances.c.sha256], instances.c.sop_instance_uid,
                     {item.header.sop_instance_uid for item in batch})
    # The last copy of each SOP instance in the batch wins; a copy identical to what is recorded changes nothing
    # and re-triggers nothing.
    latest: dict[str, ReceivedInstance] = {}
    for item in batch:
        sop_uid = item.header.sop_instance_uid
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
        return []

    reopened = []
    study_ids = _write_studies(connection, changed, reopened)
    series_ids = _write_series(connection, changed, study_ids)

    new_rows, added_per_series, added_per_study = [], Counter(), Counter()
    for item in changed:
        header, stored = item.header, item.stored
        row = {
            "series_id": series_ids[header.series_instance_uid], "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid, "transfer_syntax_uid": header.transfer_syntax_uid or None,
            "path": str(stored.path), "size_bytes": stored.size_bytes, "sha256": stored.sha256,
            "calling_aet": item.calling_aet, "received_at": item.received_at,
        }
        previous = known.get(header.sop_instance_uid)
        if previous is None:
            new_rows.append(row)
            added_per_series[row["series_id"]] += 1
            added_per_study[study_ids[header.study_instance_uid]] += 1
        else:  # a changed copy replaces the recorded one; the counts stay
            connection.execute(update(instances).where(instances.c.id == previous.id).values(**row))
    if new_rows:
        connection.execute(insert(instances), new_rows)
    for series_id, added in added_per_series.items():
        connection.execute(update(series).where(series.c.id == series_id)
                           .values(instance_count=series.c.instance_count + added))
    for study_id, added in added_per_study.items():
        connection.execute(update(studies).where(studies.c.id == study_id)
                           .values(instance_count=studies.c.instance_count + added))
    return reopened


def _write_studies(connection: Connection, batch: list[ReceivedInstance], reopened: list) -> dict[str, int]:
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
                    modalities="\\".join(sorted(arrived_modalities)) or None,
                    calling_aet=first.calling_aet,
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
            values["modalities"] = "\\".join(sorted(modalities | arrived_modalities))
        # An SR of ours (or any derived object) stored into a processed study must not re-open it: that would
        # process the study again and send another SR, a loop. Late images re-open it (once) as a new version,
        # processed again into a revised SR.
        trigger = next((item for item in arrived
                        if not is_derived_object(item.header.modality, item.header.sop_class_uid)), None)
        if row.status in _DISPATCHED_STATES and trigger is not None:
            values.update(status="receiving", version=row.version + 1, first_received_at=trigger.received_at)
            reopened.append({
                "at": trigger.received_at, "kind": "reopened", "study_instance_uid": study_uid,
                "sop_instance_uid": trigger.header.sop_instance_uid, "detail": None,
                "reason": f"new instance after the study was {row.status}: version {row.version + 1}",
            })
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
                series_number=header.series_number, instance_count=0, calling_aet=item.calling_aet or None,
                called_aet=item.called_aet or None, peer_address=(item.peer_address or "")[:64] or None,
                source=item.source,
            )
        ).inserted_primary_key[0]
    return ids
