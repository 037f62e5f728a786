"""Celery tasks. Small and idempotent: the work itself is in :mod:`worker.pipeline`."""
from __future__ import annotations

from functools import lru_cache

from pacs_bridge.schema import make_engine
from worker.celery_app import PROCESS_STUDY, make_celery
from worker.pipeline import RunProcessor

app = make_celery()


@lru_cache(maxsize=1)
def processor() -> RunProcessor:
    """One per worker process: the model is loaded once and kept."""
    settings = app.conf.triage_settings
    return RunProcessor(settings, make_engine(settings.database_url))


@app.task(name=PROCESS_STUDY)
def process_study(run_id: int) -> str:
    """Process one study version (a ``processing_runs`` row) into predictions and an SR."""
    return processor().process(run_id).status
