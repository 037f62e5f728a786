"""Study completion: deciding when a study has arrived, and handing it on as exactly one processing run.

DICOM has no "study complete" signal over C-STORE, so, as mercure and the MONAI Informatics Gateway do, we use a
quiet period: a study is complete when no instance of it has arrived for ``quiet_period_s`` **and** no open
association is still sending it. ``max_wait_s`` after its first instance a decision is forced, so a scanner that
never releases its association cannot hold a study back for ever.

A complete study gets one ``processing_runs`` row per study version (a unique constraint makes a second one
impossible), a routing event that names the rule that matched, and one task on the pipeline's queue. A study
re-sent unchanged creates no new version; one that receives new images after dispatch is re-opened as the next
version by the bookkeeper.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from pacs_bridge.routing import StudySummary, route_study
from pacs_bridge.schema import events, instances, processing_runs, series, studies, utcnow

log = logging.getLogger(__name__)

#: Called with (run_id, pipeline) once the run is committed; raises if the broker is unreachable.
Dispatch = Callable[[int, str], None]


@dataclass(frozen=True)
class CompletionPolicy:
    quiet_period_s: float = 10.0
    max_wait_s: float = 900.0


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes for timezone-aware columns; everything we store is UTC.
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


class StudyAssembler:
    """Polls the bookkeeping database for complete studies and dispatches them."""

    def __init__(
        self,
        engine: Engine,
        dispatch: Dispatch,
        policy: CompletionPolicy,
        active_studies: Callable[[], set[str]] = set,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.dispatch = dispatch
        self.policy = policy
        self.active_studies = active_studies
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="assembler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.check_once()
            except Exception:  # a database outage must not kill the loop; it retries next poll
                log.warning("completion check failed; retrying", exc_info=True)

    def check_once(self, now: datetime | None = None) -> list[int]:
        """Complete what is due and (re)dispatch runs not yet handed to the broker; returns dispatched run ids."""
        now = now or utcnow()
        active = self.active_studies()
        with self.engine.connect() as connection:
            candidates = connection.execute(
                select(studies.c.id, studies.c.study_instance_uid, studies.c.first_received_at,
                       studies.c.last_received_at).where(studies.c.status == "receiving")
            ).all()
        for row in candidates:
            quiet_for = (now - _aware(row.last_received_at)).total_seconds()
            waited = (now - _aware(row.first_received_at)).total_seconds()
            if waited >= self.policy.max_wait_s:
                self._complete(row.id, f"maximum wait of {self.policy.max_wait_s:g}s reached", now)
            elif quiet_for >= self.policy.quiet_period_s and row.study_instance_uid not in active:
                self._complete(row.id, f"quiet for {quiet_for:.1f}s with no association sending", now)
        return self._dispatch_pending(now)

    def _complete(self, study_id: int, why: str, now: datetime) -> None:
        with self.engine.begin() as connection:
            study = connection.execute(
                select(studies).where(and_(studies.c.id == study_id, studies.c.status == "receiving"))
            ).first()
            if study is None:
                return
            rows = connection.execute(
                select(series.c.modality, instances.c.sop_class_uid)
                .select_from(series.join(instances, instances.c.series_id == series.c.id))
                .where(series.c.study_id == study_id)
            ).all()
            summary = StudySummary(
                modalities=frozenset(r.modality for r in rows if r.modality),
                sop_class_uids=frozenset(r.sop_class_uid for r in rows),
            )
            decision = route_study(summary)
            detail = {"rule": decision.rule, "pipeline": decision.pipeline, "version": study.version}
            connection.execute(insert(events).values(
                at=now, kind="completion", study_instance_uid=study.study_instance_uid, reason=why, detail=detail,
            ))
            connection.execute(insert(events).values(
                at=now, kind="routing", study_instance_uid=study.study_instance_uid,
                reason=f"rule {decision.rule!r}: {decision.reason}", detail=detail,
            ))
            if decision.pipeline == "ignore":
                connection.execute(update(studies).where(and_(studies.c.id == study_id,
                                                              studies.c.version == study.version))
                                   .values(status="ignored", pipeline="ignore"))
                return
            try:
                with connection.begin_nested():
                    connection.execute(insert(processing_runs).values(
                        study_id=study_id, study_version=study.version, pipeline=decision.pipeline,
                        status="queued", attempts=0, last_image_at=study.last_received_at,
                    ))
            except IntegrityError:
                log.info("run for study %s version %d exists already", study.study_instance_uid, study.version)
            connection.execute(update(studies).where(and_(studies.c.id == study_id,
                                                          studies.c.version == study.version))
                               .values(status="queued", pipeline=decision.pipeline, dispatched_at=now))

    def _dispatch_pending(self, now: datetime) -> list[int]:
        """Hand runs to the broker. A run whose send failed (broker down) stays un-queued and is sent later."""
        with self.engine.connect() as connection:
            pending = connection.execute(
                select(processing_runs.c.id, processing_runs.c.pipeline)
                .where(and_(processing_runs.c.status == "queued", processing_runs.c.queued_at.is_(None)))
                .order_by(processing_runs.c.id)
            ).all()
        sent = []
        for run in pending:
            try:
                self.dispatch(run.id, run.pipeline)
            except Exception as exc:
                log.warning("could not dispatch run %d (%s); will retry", run.id, exc)
                break
            with self.engine.begin() as connection:
                connection.execute(update(processing_runs).where(processing_runs.c.id == run.id)
                                   .values(queued_at=now))
            sent.append(run.id)
        return sent

