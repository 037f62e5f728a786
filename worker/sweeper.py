"""Re-dispatching work whose message was lost: the database, not the broker, is the record of what is owed.

A message can vanish: Redis restarted without persistence, a worker killed after it took a message, a task
that failed because the database was down. The sweeper, running in the ``triage serve`` process, finds

* runs queued longer than ``worker.redispatch_after_s`` that no worker has started,
* runs 'running' longer than the task's hard time limit (their worker died), and
* deliveries still pending longer than ``worker.redispatch_after_s`` after they were queued or, for one that
  failed and waits for its retry (``queued_at`` then holds the retry's due time), after that retry was due,

and hands them to the broker again. Duplicates are harmless by construction: a worker claims a run with a
conditional update (one wins), and a delivered row is never sent again.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.engine import Engine

from pacs_bridge.periodic import PeriodicLoop
from sql.schema import deliveries, events, processing_runs, utcnow

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, engine: Engine, dispatch_run: Callable[[int, str, str], None],
                 dispatch_delivery: Callable[[int], None], redispatch_after_s: float, stale_running_s: float,
                 interval_s: float = 5.0) -> None:
        self.engine = engine
        self.dispatch_run = dispatch_run
        self.dispatch_delivery = dispatch_delivery
        self.redispatch_after_s = redispatch_after_s
        self.stale_running_s = stale_running_s
        self.interval_s = interval_s
        self._delivery_sent_at: dict[int, float] = {}
        self._loop = PeriodicLoop("sweep", interval_s, self.sweep_once)

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._loop.stop(timeout)

    def sweep_once(self) -> tuple[list[int], list[int]]:
        """Returns (run ids, delivery ids) handed to the broker again."""
        now = utcnow()
        queued_before = now - timedelta(seconds=self.redispatch_after_s)
        running_before = now - timedelta(seconds=self.stale_running_s)
        with self.engine.connect() as connection:
            runs = connection.execute(
                select(processing_runs.c.id, processing_runs.c.pipeline, processing_runs.c.status, processing_runs.c.lane)
                .where(or_(
                    and_(processing_runs.c.status == "queued", processing_runs.c.queued_at < queued_before),
                    # (queued_at is empty for a run a worker took into another run's batch before it was sent)
                    and_(processing_runs.c.status == "running", processing_runs.c.started_at < running_before,
                         or_(processing_runs.c.queued_at.is_(None), processing_runs.c.queued_at < running_before)),
                ))
                .order_by(processing_runs.c.id)
            ).all()
            pending = connection.execute(
                select(deliveries.c.id).where(and_(
                    deliveries.c.status == "pending",
                    func.coalesce(deliveries.c.queued_at, deliveries.c.created_at) < queued_before))
            ).scalars().all()
        sent_runs = []
        for run in runs:
            self.dispatch_run(run.id, run.pipeline, run.lane or "routine")  # an urgent run stays urgent
            with self.engine.begin() as connection:
                # queued_at moves on, so the run is not sent again before another full period has passed.
                connection.execute(update(processing_runs).where(processing_runs.c.id == run.id)
                                   .values(queued_at=now))
                connection.execute(insert(events).values(
                    at=now, kind="redispatch", reason=f"run {run.id} was {run.status} with no progress; sent again",
                    detail={"run_id": run.id}))
            sent_runs.append(run.id)
        sent_deliveries = []
        monotonic = time.monotonic()
        for delivery_id in pending:
            if monotonic - self._delivery_sent_at.get(delivery_id, -1e9) < self.redispatch_after_s:
                continue
            self.dispatch_delivery(delivery_id)
            self._delivery_sent_at[delivery_id] = monotonic
            sent_deliveries.append(delivery_id)
        if sent_runs or sent_deliveries:
            log.info("re-dispatched runs %s and deliveries %s", sent_runs, sent_deliveries)
        return sent_runs, sent_deliveries
