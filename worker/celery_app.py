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
PIPELINE_QUEUES = ("neuro_mri", "slice_knn")
#: Deliveries wait on remote peers, not GPUs: their own queue, served by CPU workers (or any worker).
DELIVERY_QUEUE = "delivery"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app = Celery("triage", broker=settings.broker_url, include=["worker.tasks"])
    hard_limit = float(settings["worker"]["task_time_limit_s"])
    # A message taken by a worker that then dies is redelivered once the visibility timeout has passed; it
    # must outlast the longest run (twice the hard limit), and the sweep for such messages runs a few times
    # within it rather than kombu's default of every 100 s.
    visibility = max(float(settings["broker"]["visibility_timeout_s"]), hard_limit * 2)
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
        task_routes={PROCESS_STUDY: {"queue": PIPELINE_QUEUES[0]}, DELIVER: {"queue": DELIVERY_QUEUE}},
        worker_hijack_root_logger=False,
    )
    app.conf.triage_settings = settings
    return app


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
