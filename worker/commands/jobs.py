"""The Celery tasks that run train's jobs, on the ``training`` queue: the nightly retraining and the fairness refresh.

The deployment's one beat (``celery -A worker.tasks beat``; ``triage train beat`` runs the same schedule, from
``worker.celery_app.beat_schedule``) sends ``triage.train_nightly`` on ``training.nightly_cron`` and
``triage.fairness_refresh`` every ``fairness.refresh_interval_s`` to the ``training`` queue by task name; the
training worker's app (:func:`training_app`, ``triage train worker``) includes this module by name and consumes
that queue, so training never stands in the way of the studies on ``neuro_mri``. The tasks read the settings
the app was made with and pass train what it needs.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from celery import Celery, shared_task

from pacs_bridge.study_attributes import AttributePolicy
from sql.database import make_engine
from train.fairness.cohort import load_cohort_db
from train.fairness.metrics import publish
from train.fairness.report import render_html
from train.fairness.store import load_latest, refresh
from worker.celery_app import FAIRNESS_REFRESH, TRAIN_NIGHTLY, TRAINING_QUEUE, make_celery
from worker.commands.train_settings import fairness_config, nightly_config
from worker.config import Settings
from worker.slice_evidence import rebuild_all

log = logging.getLogger(__name__)

NIGHTLY_TASK = TRAIN_NIGHTLY
FAIRNESS_REFRESH_TASK = FAIRNESS_REFRESH


def rebuild_vector_index(settings: Settings, outcome=None) -> None:
    """Rebuild the slice-evidence index of prior studies from its table (when slice evidence is on)."""
    if not settings.slice_evidence.enabled:
        return
    engine = make_engine(settings.database_url)
    try:
        counts = rebuild_all(settings, engine)  # one index per partition (modality and body region)
        log.info("vector index rebuilt: %s studies by partition", counts)
    finally:
        engine.dispose()


def training_app(settings: Settings) -> Celery:
    """The Celery app of the training worker, with this module's tasks. Its beat schedule is the deployment's
    one schedule (``make_celery`` sets it from the settings)."""
    app = make_celery(settings)
    app.conf.include = [*app.conf.include, __name__]
    app.conf.task_routes = {**(app.conf.task_routes or {}), NIGHTLY_TASK: {"queue": TRAINING_QUEUE},
                            FAIRNESS_REFRESH_TASK: {"queue": TRAINING_QUEUE}}
    return app


def run_nightly_job(settings: Settings, console=None):
    """One nightly retraining now, with the slice-evidence index rebuilt after it."""
    # torch (the heads' retraining): loaded by the training worker's first run, not by every command.
    from train.nightly import run_nightly

    return run_nightly(make_engine(settings.database_url), nightly_config(settings), console,
                       after_run=lambda result: rebuild_vector_index(settings, result))


@shared_task(name=NIGHTLY_TASK, bind=True, time_limit=6 * 3600, soft_time_limit=5.5 * 3600)
def train_nightly(task) -> str:
    outcome = run_nightly_job(task.app.conf.triage_settings)
    return f"{outcome.status}:{outcome.decision}"


@shared_task(name=FAIRNESS_REFRESH_TASK, bind=True, time_limit=3600, soft_time_limit=3300)
def fairness_refresh(task) -> str:
    return refresh_fairness(task.app.conf.triage_settings)


def fairness_report_path(settings: Settings) -> Path:
    return Path(settings.fairness.report_path or settings.var_dir / "fairness" / "report.html")


def refresh_fairness(settings: Settings) -> str:
    """One scheduled fairness refresh: analyse and store, set the Prometheus gauges, write the HTML report."""
    fairness = settings.fairness
    engine = make_engine(settings.database_url)
    try:
        results = refresh(engine, fairness_config(fairness), AttributePolicy.from_settings(fairness.model_dump()))
        publish(results, time.time())
        with engine.connect() as connection:
            stored, cohort = load_latest(connection), load_cohort_db(connection)
    finally:
        engine.dispose()
    out = fairness_report_path(settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(stored, cohort))
    log.info("fairness refresh %s: report %s", results.refresh_id, out)
    return f"refresh:{results.refresh_id}"
