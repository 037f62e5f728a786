"""The broker's queues as an operator needs to see them: how much work waits in each, and whether a worker
consumes each queue that studies are routed to.

Depth: Celery's Redis transport keeps a queue's messages in one Redis list per priority step (kombu's
``PRIORITY_STEPS``; the list of step 0 is named after the queue, the others ``<queue>\\x06\\x16<step>``), and the
routine lane is sent with priority 6 (``worker.celery_app.LANE_PRIORITY``): counting only the queue's own list
would show routine work as 0. Every step's list is counted.

Consumers: a study routed to a pipeline whose queue no worker consumes would wait silently (and so would the
beat's jobs on a deployment without their worker). ``QueueWatch`` asks
the workers which queues they consume (one broadcast, ``app.control.inspect().active_queues()`` with a short
timeout) every ``broker.consumer_check_interval_s``, never per study; a routed queue without a consumer sets
``triage_queue_without_consumer`` and, while messages wait in it, writes a ``queue_without_consumer`` event.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator

from celery import Celery
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from sql.schema import events, utcnow
from worker.celery_app import (
    DELIVERY_QUEUE,
    MAINTENANCE_QUEUE,
    PIPELINE_QUEUES,
    TRAINING_QUEUE,
    beat_schedule,
)
from worker.config import Settings

log = logging.getLogger(__name__)

#: The queues whose depth is exported.
WATCHED_QUEUES = (*PIPELINE_QUEUES, DELIVERY_QUEUE, MAINTENANCE_QUEUE, TRAINING_QUEUE)
EVENT_KIND = "queue_without_consumer"


def priority_lists(queue: str, steps: Iterable[int] | None = None) -> list[str]:
    """The Redis lists that hold ``queue``'s messages, one per priority step (as kombu's ``_q_for_pri`` names
    them)."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in (steps or PRIORITY_STEPS)]


def redis_depths(broker_url: str, queues: Iterable[str] = WATCHED_QUEUES,
                 steps: Iterable[int] | None = None) -> dict[str, int]:
    """Messages waiting in each queue, all priority steps together (one round trip). Raises redis' errors."""
    import redis

    queues = list(queues)
    client = redis.Redis.from_url(broker_url, socket_timeout=2)
    try:
        pipe = client.pipeline(transaction=False)
        names = {queue: priority_lists(queue, steps) for queue in queues}
        for queue in queues:
            for name in names[queue]:
                pipe.llen(name)
        counts = iter(pipe.execute())
        return {queue: sum(next(counts) for _ in names[queue]) for queue in queues}
    finally:
        client.close()


def routed_queues(settings: Settings) -> dict[str, list[str]]:
    """The queues work is sent to, each with what sends work there (rule names, deliveries)."""
    routing = settings.routing
    found: dict[str, list[str]] = {}
    for rule in [*routing.rules, routing.fallback]:
        pipeline = rule.get("pipeline")
        if pipeline and pipeline != "ignore":
            found.setdefault(pipeline, []).append(f"rule {rule.get('name', '?')!r}")
    if settings.destinations or settings.publishers:
        found.setdefault(DELIVERY_QUEUE, []).append("deliveries and publications")
    for name, entry in beat_schedule(settings).items():  # a job nobody runs: no retraining, no fairness refresh
        found.setdefault(entry["options"]["queue"], []).append(f"beat entry {name!r}")
    return found


def consumers_per_queue(app: Celery, timeout_s: float = 1.0) -> dict[str, int]:
    """How many workers consume each queue, from the workers' own answers; raises if the broker cannot be
    reached. No answer at all means no worker is running."""
    replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    counts: dict[str, int] = {}
    for queues in replies.values():
        for queue in queues or []:
            counts[queue["name"]] = counts.get(queue["name"], 0) + 1
    return counts


class QueueWatch:
    """Checks every ``interval_s`` that each routed queue has a consumer; exposes the result as metrics."""

    def __init__(self, app: Celery, settings: Settings, engine: Engine, interval_s: float,
                 timeout_s: float = 1.0) -> None:
        self.app, self.settings, self.engine = app, settings, engine
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.routed = routed_queues(settings)
        #: Per routed queue, its consumers at the last check (empty before the first).
        self.consumers: dict[str, int] = {}
        self._reported: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception:  # broker or database down: the next check tells
                log.warning("queue consumer check failed; next in %.0f s", self.interval_s, exc_info=True)
            self._stop.wait(self.interval_s)

    def check_once(self) -> list[str]:
        """Ask the workers; returns the routed queues without a consumer (and records the new ones with waiting
        messages as events)."""
        counts = consumers_per_queue(self.app, self.timeout_s)
        self.consumers = {queue: counts.get(queue, 0) for queue in self.routed}
        missing = [queue for queue, n in self.consumers.items() if n == 0]
        self._reported &= set(missing)  # a queue consumed again is reported again if it loses its workers
        depths = redis_depths(self.settings.broker_url, missing) if missing else {}
        for queue in missing:
            if depths.get(queue, 0) == 0 or queue in self._reported:
                continue
            reason = (f"{depths[queue]} messages wait in queue {queue!r} (sent there by "
                      f"{', '.join(self.routed[queue])}) and no worker consumes it: start one with "
                      f"`triage worker --queues {queue}`")
            log.warning(reason)
            with self.engine.begin() as connection:
                connection.execute(insert(events).values(
                    at=utcnow(), kind=EVENT_KIND, reason=reason,
                    detail={"queue": queue, "waiting": depths[queue], "sent_by": self.routed[queue]}))
            self._reported.add(queue)
        return missing

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        if not self.consumers:
            return
        consumers = GaugeMetricFamily("triage_queue_consumers", "Workers consuming a routed queue at the last check",
                                      labels=["queue"])
        without = GaugeMetricFamily("triage_queue_without_consumer",
                                    "1 when work is routed to the queue and no worker consumes it", labels=["queue"])
        for queue, n in sorted(self.consumers.items()):
            consumers.add_metric([queue], n)
            without.add_metric([queue], 0 if n else 1)
        yield consumers
        yield without
