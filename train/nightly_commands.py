"""``triage train nightly | worker | beat``: the nightly retraining from the command line and from Celery beat.

The job itself is :mod:`train.nightly`; this module stays light to import (the command line builds every
parser at start-up) and loads torch only when a command runs.

Celery: ``triage train beat`` sends ``triage.train_nightly`` on ``training.nightly_cron`` to the ``training``
queue; ``triage train worker`` consumes that queue (training runs on its own worker, never in the way of the
studies on ``neuro_mri``). ``triage train nightly`` runs the job once, now, in this process.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

NIGHTLY_TASK = "triage.train_nightly"
TRAINING_QUEUE = "training"


def beat_schedule(settings) -> dict[str, Any]:
    """The Celery beat entry of the nightly job, from ``training.nightly_cron`` ("minute hour dom month dow")."""
    from celery.schedules import crontab

    minute, hour, day_of_month, month, day_of_week = str(settings["training"]["nightly_cron"]).split()
    return {
        "nightly-retraining": {
            "task": NIGHTLY_TASK,
            "schedule": crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month,
                                day_of_week=day_of_week),
            "options": {"queue": TRAINING_QUEUE},
        }
    }


def rebuild_vector_index(settings, outcome=None) -> None:
    """Rebuild the slice-evidence index of prior studies from its table (when slice evidence is on)."""
    import logging

    if not settings["slice_evidence"]["enabled"]:
        return
    from pacs_bridge.schema import make_engine
    from worker.slice_evidence import rebuild_all

    engine = make_engine(settings.database_url)
    try:
        counts = rebuild_all(settings, engine)  # one index per partition (modality and body region)
        logging.getLogger(__name__).info("vector index rebuilt: %s studies by partition", counts)
    finally:
        engine.dispose()


def training_app(settings):
    """The Celery app with the nightly task registered and its beat schedule set (``triage train worker|beat``)."""
    from worker.celery_app import make_celery

    app = make_celery(settings)

    @app.task(name=NIGHTLY_TASK, time_limit=6 * 3600, soft_time_limit=5.5 * 3600)
    def train_nightly() -> str:
        from pacs_bridge.schema import make_engine
        from train.nightly import NightlyConfig, run_nightly

        outcome = run_nightly(make_engine(settings.database_url), NightlyConfig.from_settings(settings),
                              after_run=lambda result: rebuild_vector_index(settings, result))
        return f"{outcome.status}:{outcome.decision}"

    app.conf.beat_schedule = beat_schedule(settings)
    app.conf.task_routes = {**(app.conf.task_routes or {}), NIGHTLY_TASK: {"queue": TRAINING_QUEUE}}
    return app


def _nightly_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pacs_bridge.schema import make_engine
    from train.nightly import NightlyConfig, run_nightly
    from worker.config import load_settings

    settings = load_settings(args.config)
    config = NightlyConfig.from_settings(settings)
    if args.seed is not None:
        config = replace(config, seed=args.seed, heads=replace(config.heads, seed=args.seed))
    outcome = run_nightly(make_engine(args.url or settings.database_url), config, Console(stderr=True),
                          after_run=lambda result: rebuild_vector_index(settings, result))
    print(json.dumps({"run_id": outcome.run_id, "status": outcome.status, "decision": outcome.decision,
                      "base_version": outcome.base_version, "candidate_version": outcome.candidate_version,
                      "reason": outcome.reason,
                      "gates": {k: v["passed"] for k, v in outcome.gates.items()}}), flush=True)
    return 0 if outcome.status in ("done", "skipped") else 1


def _worker_command(args: argparse.Namespace) -> int:
    from worker.config import load_settings

    app = training_app(load_settings(args.config))
    app.worker_main(["worker", "--pool", "solo", "--concurrency", "1", "--queues", TRAINING_QUEUE,
                     "--loglevel", args.loglevel, "--without-gossip", "--without-mingle"])
    return 0


def _beat_command(args: argparse.Namespace) -> int:
    from worker.config import load_settings

    settings = load_settings(args.config)
    app = training_app(settings)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    app.Beat(schedule=str(settings.var_dir / "celerybeat-schedule"), loglevel=args.loglevel).run()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``triage train nightly | worker | beat``."""
    train = subparsers.add_parser("train", help="retraining: the nightly job, its worker and its schedule")
    sub = train.add_subparsers(dest="train_command", required=True)
    p = sub.add_parser("nightly", help="run the nightly retraining once now; prints a JSON line last")
    p.add_argument("--url", help="database URL (default: from the configuration)")
    p.add_argument("--seed", type=int, help="override training.seed")
    p.set_defaults(func=_nightly_command)
    p = sub.add_parser("worker", help=f"a Celery worker for the '{TRAINING_QUEUE}' queue (runs the nightly job)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=_worker_command)
    p = sub.add_parser("beat", help="Celery beat: sends the nightly job on training.nightly_cron")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=_beat_command)
