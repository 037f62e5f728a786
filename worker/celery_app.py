"""The Celery application: broker, reliability settings and routing, all declared here.

Settings follow ``shared/reference/performance.md`` §6: tasks are acknowledged late and rejected when the worker
is lost, so a crash mid-study redelivers the study; the worker reserves one task at a time; results are not
stored (they go to the database); time limits stay inside the broker's visibility timeout.
"""
from __future__ import annotations

from celery import Celery

from worker.config import Settings, load_settings

PROCESS_STUDY = "triage.process_study"
DELIVER = "triage.deliver"
#: Raising a study's priority in the worklist systems: retried like a delivery, on the delivery queue.
PUBLISH = "triage.publish"
PIPELINE_QUEUES = ("neuro_mri", "slice_knn")
#: Deliveries wait on remote peers, not GPUs: their own queue, served by CPU workers (or any worker).
DELIVERY_QUEUE = "delivery"
#: Periodic housekeeping of the service (index maintenance, store reconciliation), served by the CPU workers.
MAINTENANCE_QUEUE = "maintenance"
INDEX_MAINTENANCE = "triage.index_maintenance"
RECONCILE_STORE = "triage.reconcile_store"
#: Tasks of the training worker (``triage train worker``, defined in worker/commands/jobs.py, the only part of
#: ``worker`` besides the CLI that imports ``train``): the beat schedule names them, and beat sends them by name.
TRAINING_QUEUE = "training"
TRAIN_NIGHTLY = "triage.train_nightly"
FAIRNESS_REFRESH = "triage.fairness_refresh"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app = Celery("triage", broker=settings.broker_url, include=["worker.tasks"])
    hard_limit = float(settings.worker.task_time_limit_s)
    # A message taken by a worker that then dies is redelivered once the visibility timeout has passed; it
    # must outlast the longest run (twice the hard limit), and the sweep for such messages runs a few times
    # within it rather than kombu's default of every 100 s.
    visibility = max(float(settings.broker.visibility_timeout_s), hard_limit * 2)
    transport_options: dict[str, object] = {
        "visibility_timeout": visibility,
        "unacked_restore_interval": max(visibility / 5, 1.0),
        "unacked_restore_throttle": 1,
    }
    if settings.broker_url.startswith("filesystem"):
        # The embedded broker: one local folder, no server (verified with Celery 5.7 in performance.md).
        folder = settings.var_dir / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options.update(
            data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
            data_folder_processed=str(folder / "processed"), polling_interval=0.2,
            # kombu otherwise puts its control exchange in ./control of whatever the working directory is.
            control_folder=str(folder / "control"),
        )
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_ignore_result=True,
        task_time_limit=hard_limit,
        task_soft_time_limit=hard_limit * 0.9,
        task_default_queue=PIPELINE_QUEUES[0],
        task_routes={PROCESS_STUDY: {"queue": PIPELINE_QUEUES[0]}, DELIVER: {"queue": DELIVERY_QUEUE},
                     PUBLISH: {"queue": DELIVERY_QUEUE}, INDEX_MAINTENANCE: {"queue": MAINTENANCE_QUEUE},
                     RECONCILE_STORE: {"queue": MAINTENANCE_QUEUE}, TRAIN_NIGHTLY: {"queue": TRAINING_QUEUE},
                     FAIRNESS_REFRESH: {"queue": TRAINING_QUEUE}},
        worker_hijack_root_logger=False,
        beat_schedule=beat_schedule(settings),
    )
    app.conf.triage_settings = settings
    return app


def crontab_of(fields: str, key: str):
    """A Celery crontab from five crontab fields ("minute hour day-of-month month day-of-week")."""
    from celery.schedules import crontab

    parts = str(fields).split()
    if len(parts) != 5:
        raise ValueError(f"{key}: {fields!r} is not five crontab fields (minute hour day-of-month month "
                         "day-of-week)")
    minute, hour, day_of_month, month, day_of_week = parts
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month,
                   day_of_week=day_of_week)


def beat_schedule(settings: Settings) -> dict[str, dict]:
    """Every periodic job of the product, for the one Celery beat of a deployment (``celery -A worker.tasks
    beat``). Each entry names its task and queue, so that beat needs none of the tasks' code: the training
    worker runs the first two, the CPU workers (queue ``maintenance``) the others."""
    from datetime import timedelta

    schedule = {
        "nightly-retraining": {
            "task": TRAIN_NIGHTLY, "options": {"queue": TRAINING_QUEUE},
            "schedule": crontab_of(settings.training.nightly_cron, "training.nightly_cron"),
        },
    }
    # An interval of 0 or an empty crontab turns a job off (each can be run by hand: `triage fairness refresh
    # --every 0`, `triage index rebuild`).
    fairness_every = float(settings.fairness.refresh_interval_s)
    if fairness_every > 0:
        schedule["fairness-refresh"] = {"task": FAIRNESS_REFRESH, "options": {"queue": TRAINING_QUEUE},
                                        "schedule": timedelta(seconds=fairness_every)}
    maintenance = settings.maintenance
    if maintenance.index_cron:
        schedule["index-maintenance"] = {"task": INDEX_MAINTENANCE, "options": {"queue": MAINTENANCE_QUEUE},
                                         "schedule": crontab_of(maintenance.index_cron, "maintenance.index_cron")}
    if maintenance.reconcile_cron:
        schedule["store-reconciliation"] = {
            "task": RECONCILE_STORE, "options": {"queue": MAINTENANCE_QUEUE},
            "schedule": crontab_of(maintenance.reconcile_cron, "maintenance.reconcile_cron")}
    return schedule


#: Message priority per routing lane. With Redis the lower number is taken first (kombu's priority steps 0, 3,
#: 6, 9); the embedded filesystem broker ignores priorities.
LANE_PRIORITY = {"urgent": 0, "routine": 6}


def dispatcher(app: Celery):
    """The :data:`pacs_bridge.assembly.Dispatch` callable: one task per run, on the pipeline's queue, with the
    priority of the run's lane."""

    def dispatch(run_id: int, pipeline: str, lane: str = "routine") -> None:
        app.send_task(PROCESS_STUDY, args=[run_id], queue=pipeline,
                      priority=LANE_PRIORITY.get(lane, LANE_PRIORITY["routine"]))

    return dispatch
