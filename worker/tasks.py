"""Celery tasks. Small and idempotent: the work itself is in :mod:`worker.pipeline`."""
from __future__ import annotations

from functools import lru_cache

from pacs_bridge.schema import make_engine
from worker.celery_app import DELIVER, DELIVERY_QUEUE, PROCESS_STUDY, make_celery
from worker.delivery import DeliveryBook
from worker.pipeline import RunProcessor

app = make_celery()


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


@app.task(name=PROCESS_STUDY)
def process_study(run_id: int) -> str:
    """Process one study version (a ``processing_runs`` row) into predictions and an SR."""
    return processor().process(run_id).status


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
