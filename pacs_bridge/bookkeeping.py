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
    """Write a batch in the caller's transaction. Idempotent: re-writing the same instances changes nothing."""
    event_rows = [
        {
            "at": item.at, "kind": item.kind, "reason": item.reason, "study_instance_uid": item.study_instance_uid,
            "sop_instance_uid": item.sop_instance_uid, "detail": item.detail,
        }
        for item in items if isinstance(item, EventRecord)
    ]
    for item in items:
        if isinstance(item, ReceivedInstance):
            _record_instance(connection, item)
    if event_rows:
        connection.execute(insert(events), event_rows)


def _record_instance(connection: Connection, item: ReceivedInstance) -> None:
    header, stored = item.header, item.stored
    existing_instance = connection.execute(
        select(instances.c.id, instances.c.sha256).where(instances.c.sop_instance_uid == header.sop_instance_uid)
    ).first()
    if existing_instance is not None and existing_instance.sha256 == stored.sha256:
        return  # a re-sent copy of what we hold: nothing changes, nothing is re-triggered

    study = connection.execute(
        select(studies.c.id, studies.c.status, studies.c.version, studies.c.modalities)
        .where(studies.c.study_instance_uid == header.study_instance_uid)
    ).first()
    attrs = header.study_attributes
    if study is None:
        study_id = connection.execute(
            insert(studies).values(
                study_instance_uid=header.study_instance_uid,
                accession_number=attrs.get("AccessionNumber") or None,
                study_description=attrs.get("StudyDescription") or None,
                patient_sex=attrs.get("PatientSex") or None,
                patient_age=attrs.get("PatientAge") or None,
                study_date=attrs.get("StudyDate") or None,
                modalities=header.modality or None,
                calling_aet=item.calling_aet,
                status="receiving",
                version=1,
                instance_count=0,
                first_received_at=item.received_at,
                last_received_at=item.received_at,
            )
        ).inserted_primary_key[0]
    else:
        study_id = study.id
        values: dict[str, Any] = {"last_received_at": item.received_at}
        modalities = set(filter(None, (study.modalities or "").split("\\")))
        if header.modality and header.modality not in modalities:
            values["modalities"] = "\\".join(sorted(modalities | {header.modality}))
        # An SR of ours (or any derived object) stored into a processed study must not re-open it: that would
        # process the study again and send another SR, a loop.
        if study.status in _DISPATCHED_STATES and not is_derived_object(header.modality, header.sop_class_uid):
            # Late images: the study re-opens as a new version, processed again into a revised SR.
            values.update(status="receiving", version=study.version + 1, first_received_at=item.received_at)
            connection.execute(insert(events).values(
                at=item.received_at, kind="reopened", study_instance_uid=header.study_instance_uid,
                sop_instance_uid=header.sop_instance_uid,
                reason=f"new instance after the study was {study.status}: version {study.version + 1}",
            ))
        connection.execute(update(studies).where(studies.c.id == study_id).values(**values))

    series_row = connection.execute(
        select(series.c.id).where(series.c.series_instance_uid == header.series_instance_uid)
    ).first()
    if series_row is None:
        series_id = connection.execute(
            insert(series).values(
                study_id=study_id, series_instance_uid=header.series_instance_uid, modality=header.modality or None,
                series_description=header.series_description or None, series_number=header.series_number,
                instance_count=0, calling_aet=item.calling_aet or None, called_aet=item.called_aet or None,
                peer_address=(item.peer_address or "")[:64] or None, source=item.source,
            )
        ).inserted_primary_key[0]
    else:
        series_id = series_row.id

    row = {
        "series_id": series_id, "sop_instance_uid": header.sop_instance_uid, "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid or None, "path": str(stored.path),
        "size_bytes": stored.size_bytes, "sha256": stored.sha256, "calling_aet": item.calling_aet,
        "received_at": item.received_at,
    }
    if existing_instance is None:
        connection.execute(insert(instances).values(**row))
        connection.execute(
            update(series).where(series.c.id == series_id).values(instance_count=series.c.instance_count + 1)
        )
        connection.execute(
            update(studies).where(studies.c.id == study_id).values(instance_count=studies.c.instance_count + 1)
        )
    else:
        connection.execute(update(instances).where(instances.c.id == existing_instance.id).values(**row))
