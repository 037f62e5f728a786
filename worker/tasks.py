"""Celery tasks. Small and idempotent: the work itself is in :mod:`worker.pipeline`."""
from __future__ import annotations

import logging
from functools import lru_cache

from celery.signals import worker_ready
from sqlalchemy import text

from pacs_bridge.schema import make_engine
from worker.celery_app import DELIVER, DELIVERY_QUEUE, PROCESS_STUDY, make_celery
from worker.delivery import DeliveryBook
from worker.pipeline import RunProcessor

app = make_celery()
log = logging.getLogger(__name__)


@worker_ready.connect
def _serve_health(**_) -> None:
    """/metrics, /healthz, /readyz of this worker process, when metrics.worker_port is set."""
    from worker.metrics import HealthServer, sample_gpu_utilisation

    settings = app.conf.triage_settings
    port = int(settings["metrics"]["worker_port"])
    if not port:
        return
    engine = processor().engine

    def database_ready() -> bool:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True

    def broker_ready() -> bool:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1)
        return True

    from worker.model_readiness import ModelReadiness

    # Ready only with a servable model: a worker without one would take studies off the queue and fail them.
    model_ready = ModelReadiness(settings, engine, lambda: processor().loaded_version)
    try:
        HealthServer(settings["metrics"]["host"], port,
                     checks={"database": database_ready, "broker": broker_ready, "model": model_ready},
                     before_scrape=sample_gpu_utilisation).start()
    except OSError as exc:
        log.warning("worker metrics endpoint on port %d not started: %s", port, exc)


@lru_cache(maxsize=1)
def processor() -> RunProcessor:
    """One per worker process: the model is loaded once and kept."""
    settings = app.conf.triage_settings
    return RunProcessor(settings, make_engine(settings.database_url),
                        enqueue_delivery=lambda delivery_id: deliver.apply_async(args=[delivery_id],
                                                                                 queue=DELIVERY_QUEUE))


@lru_cache(maxsize=1)
def delivery_book() -> DeliveryBook:
    settings = app.conf.triage_settings
    return DeliveryBook(settings, make_engine(settings.database_url))


@app.task(name=PROCESS_STUDY, bind=True)
def process_study(self, run_id: int) -> str:
    """Process one study version (a ``processing_runs`` row) into predictions and an SR."""
    return processor().process(run_id, worker_name=self.request.hostname).status


@app.task(name=DELIVER, bind=True)
def deliver(self, delivery_id: int) -> str:
    """One delivery attempt; on failure re-queued with exponential backoff, then dead-lettered."""
    book = delivery_book()
    outcome = book.attempt(delivery_id)
    if outcome.delivered:
        return "delivered"
    if outcome.unknown_destination or self.request.retries + 1 >= book.max_attempts:
        book.dead_letter(delivery_id)
        return "dead"
    backoff = float(book.settings["delivery"]["backoff_s"])
    raise self.retry(countdown=backoff * 2 ** self.request.retries, max_retries=book.max_attempts)
