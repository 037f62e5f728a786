"""Celery tasks. Small and idempotent: the work itself is in the pipelines (:mod:`worker.pipelines`),
recorded by the run book (:mod:`worker.run_book`), and in :mod:`worker.delivery`."""
from __future__ import annotations

import logging
import time
from functools import lru_cache

from celery.signals import worker_ready
from sqlalchemy import text

from pacs_bridge.publishers import FAILED
from sql.database import make_engine
from worker.celery_app import (
    DELIVER,
    DELIVERY_QUEUE,
    INDEX_MAINTENANCE,
    PROCESS_STUDY,
    PUBLISH,
    RECONCILE_STORE,
    make_celery,
)
from worker.delivery import DeliveryBook, RetryPolicy
from worker.pipelines import PIPELINES
from worker.pipelines.neuro_mri import NeuroMriPipeline
from worker.run_book import RunBook, RunFailed

app = make_celery()
log = logging.getLogger(__name__)


@worker_ready.connect
def _serve_health(**_) -> None:
    """/metrics, /healthz, /readyz of this worker process, when metrics.worker_port is set."""
    from worker.metrics import HealthServer, sample_gpu_utilisation

    settings = app.conf.triage_settings
    port = int(settings.metrics.worker_port)
    if not port:
        return
    engine = run_book().engine

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
    model_ready = ModelReadiness(settings, engine, lambda: neuro_mri().loaded_version)
    try:
        HealthServer(settings.metrics.host, port,
                     checks={"database": database_ready, "broker": broker_ready, "model": model_ready},
                     before_scrape=sample_gpu_utilisation).start()
    except OSError as exc:
        log.warning("worker metrics endpoint on port %d not started: %s", port, exc)


@lru_cache(maxsize=1)
def run_book() -> RunBook:
    """One per worker process, shared by its pipelines."""
    settings = app.conf.triage_settings
    return RunBook(settings, make_engine(settings.database_url),
                   enqueue_delivery=lambda delivery_id: deliver.apply_async(args=[delivery_id],
                                                                            queue=DELIVERY_QUEUE),
                   enqueue_publication=enqueue_publication)


@lru_cache(maxsize=None)
def pipeline(name: str):
    """The pipeline ``name`` of this worker process, made at its first run: its model is loaded once, kept."""
    return PIPELINES[name](run_book())


def neuro_mri() -> NeuroMriPipeline:
    return pipeline("neuro_mri")


def enqueue_publication(run_id: int) -> None:
    """The run's worklist publications as a task of their own on the delivery queue: a RIS that is slow or down
    then costs the GPU task nothing, and the raise is retried like a delivery."""
    publish.apply_async(args=[run_id], kwargs={"first_tried_at": time.time()}, queue=DELIVERY_QUEUE)


@lru_cache(maxsize=1)
def delivery_book() -> DeliveryBook:
    settings = app.conf.triage_settings
    return DeliveryBook(settings, make_engine(settings.database_url))


@app.task(name=PROCESS_STUDY, bind=True)
def process_study(self, run_id: int) -> str:
    """Process one study version (a ``processing_runs`` row) into predictions and an SR, by the pipeline the
    run was routed to."""
    name = run_book().pipeline_of(run_id)
    if name is None:
        raise RunFailed(f"processing run {run_id} does not exist")
    if name not in PIPELINES:
        raise RunFailed(f"processing run {run_id}: no pipeline named {name!r} "
                        f"(one of {', '.join(PIPELINES)})")
    return pipeline(name).process(run_id, worker_name=self.request.hostname).status


@app.task(name=DELIVER, bind=True, max_retries=None)
def deliver(self, delivery_id: int) -> str:
    """One delivery attempt; on failure re-queued after the retry policy's backoff (delivery.*), dead-lettered
    once the policy gives up."""
    book = delivery_book()
    outcome = book.attempt(delivery_id)
    if outcome.delivered:
        return "delivered"
    delay = None if outcome.unknown_destination else book.next_attempt_in(delivery_id)
    if delay is None:
        book.dead_letter(delivery_id)
        return "dead"
    log.info("delivery %d failed (%s); next attempt in %.0f s", delivery_id, outcome.error, delay)
    raise self.retry(countdown=delay)


@app.task(name=PUBLISH, bind=True, max_retries=None)
def publish(self, run_id: int, publishers: list[str] | None = None, first_tried_at: float | None = None) -> str:
    """Raise the run's priority with each configured publisher (or the named ones, on a retry); publishers that
    could not be reached are tried again under the delivery retry policy, then dead-lettered."""
    from worker.publishing import dead_letter_publications, publish_run

    settings = app.conf.triage_settings
    engine = processor_engine()
    first_tried_at = first_tried_at or time.time()
    failed = sorted({p.publisher for p in publish_run(settings, engine, run_id, only=publishers)
                     if p.action == FAILED})
    if not failed:
        return "published"
    delay = RetryPolicy.from_settings(settings).next_delay(self.request.retries + 1, time.time() - first_tried_at)
    if delay is None:
        dead_letter_publications(engine, run_id, failed, attempts=self.request.retries + 1)
        return "dead"
    log.info("run %d: publishing to %s failed; next attempt in %.0f s", run_id, ", ".join(failed), delay)
    raise self.retry(countdown=delay, kwargs={"publishers": failed, "first_tried_at": first_tried_at})


@lru_cache(maxsize=1)
def processor_engine():
    settings = app.conf.triage_settings
    return make_engine(settings.database_url)


@app.task(name=INDEX_MAINTENANCE)
def index_maintenance() -> str:
    """Periodic rebuild of the slice-evidence vector index from its table: rows deleted elsewhere are compacted
    away and the index kind (exact, ivf, hnsw) is chosen anew for its size."""
    settings = app.conf.triage_settings
    if not settings.slice_evidence.enabled:
        return "disabled"
    from worker.slice_evidence import index_book

    book = index_book(settings, processor_engine())
    count = book.rebuild()
    log.info("index maintenance: %s rebuilt with %d studies", book.path, count)
    return f"rebuilt:{count}"


@app.task(name=RECONCILE_STORE)
def reconcile_store() -> str:
    """A periodic pass over the whole store (``var/incoming``): files without a database row are recorded
    through the intake checks, or quarantined. The receiver's own passes look only at the folders changed
    since its last one; this one looks at every folder, leaving files younger than store.reconcile_grace_s to
    the bookkeeper that is writing them (the receiver runs meanwhile: never ``full``)."""
    # Imported here: the reconciliation belongs to the DICOM edge and is loaded only where the task runs.
    from pacs_bridge.reconcile import reconcile_store as reconcile

    settings = app.conf.triage_settings
    report = reconcile(processor_engine(), settings.incoming_dir, settings.quarantine_dir,
                       grace_s=float(settings.store.reconcile_grace_s), fsync=bool(settings.store.fsync))
    log.info("store reconciliation: %s", report.as_dict())
    return f"recorded:{report.recorded} quarantined:{report.quarantined}"
