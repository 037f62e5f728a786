"""``triage train nightly | worker | beat``: the nightly retraining from the command line and the training worker.

The job itself is :mod:`train.nightly`; this module stays light to import (the command line builds every
parser at start-up) and loads torch only when a command runs.

Celery: the deployment's one beat (``celery -A worker.tasks beat``; ``triage train beat`` runs the same schedule,
from ``worker.celery_app.beat_schedule``) sends ``triage.train_nightly`` on ``training.nightly_cron`` and
``triage.fairness_refresh`` every ``fairness.refresh_interval_s`` to the ``training`` queue by task name;
``triage train worker`` consumes that queue (training runs on its own worker, never in the way of the studies on
``neuro_mri``). ``triage train nightly`` runs the job once, now, in this process.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

NIGHTLY_TASK = "triage.train_nightly"
FAIRNESS_REFRESH_TASK = "triage.fairness_refresh"
TRAINING_QUEUE = "training"


def rebuild_vector_index(settings, outcome=None) -> None:
    """Rebuild the slice-evidence index of prior studies from its table (when slice evidence is on)."""
    import logging

    if not settings["slice_evidence"]["enabled"]:
        return
    from sql.database import make_engine
    from worker.slice_evidence import rebuild_all

    engine = make_engine(settings.database_url)
    try:
        counts = rebuild_all(settings, engine)  # one index per partition (modality and body region)
        logging.getLogger(__name__).info("vector index rebuilt: %s studies by partition", counts)
    finally:
        engine.dispose()


def training_app(settings):
    """The Celery app of the training worker: the nightly job and the fairness refresh registered on it. Its
    beat schedule is the deployment's one schedule (``make_celery`` sets it from the settings)."""
    from worker.celery_app import make_celery

    app = make_celery(settings)

    @app.task(name=NIGHTLY_TASK, time_limit=6 * 3600, soft_time_limit=5.5 * 3600)
    def train_nightly() -> str:
        from sql.database import make_engine
        from train.nightly import NightlyConfig, run_nightly

        outcome = run_nightly(make_engine(settings.database_url), NightlyConfig.from_settings(settings),
                              after_run=lambda result: rebuild_vector_index(settings, result))
        return f"{outcome.status}:{outcome.decision}"

    @app.task(name=FAIRNESS_REFRESH_TASK, time_limit=3600, soft_time_limit=3300)
    def fairness_refresh() -> str:
        return refresh_fairness(settings)

    app.conf.task_routes = {**(app.conf.task_routes or {}), NIGHTLY_TASK: {"queue": TRAINING_QUEUE},
                            FAIRNESS_REFRESH_TASK: {"queue": TRAINING_QUEUE}}
    return app


def refresh_fairness(settings) -> str:
    """One scheduled fairness refresh: analyse and store, set the Prometheus gauges, write the HTML report."""
    import logging
    import time
    from pathlib import Path

    from sql.database import make_engine
    from pacs_bridge.study_attributes import AttributePolicy
    from train.fairness.analysis import FairnessConfig
    from train.fairness.cohort import load_cohort_db
    from train.fairness.metrics import publish
    from train.fairness.report import render_html
    from train.fairness.store import load_latest, refresh

    fairness = settings["fairness"]
    engine = make_engine(settings.database_url)
    try:
        results = refresh(engine, FairnessConfig.from_settings(fairness), AttributePolicy.from_settings(fairness))
        publish(results, time.time())
        with engine.connect() as connection:
            stored, cohort = load_latest(connection), load_cohort_db(connection)
    finally:
        engine.dispose()
    out = Path(fairness["report_path"] or settings.var_dir / "fairness" / "report.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(stored, cohort))
    logging.getLogger(__name__).info("fairness refresh %s: report %s", results.refresh_id, out)
    return f"refresh:{results.refresh_id}"


def _nightly_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sql.database import make_engine
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

    settings = load_settings(args.config)
    app = training_app(settings)
    port = int(settings["fairness"]["metrics_port"])
    if port:  # the gauges the scheduled fairness refresh sets in this process
        from prometheus_client import start_http_server

        start_http_server(port, addr=settings["metrics"]["host"])
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
    p = sub.add_parser("worker", help=f"a Celery worker for the '{TRAINING_QUEUE}' queue (the nightly job, the "
                                      "fairness refresh)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=_worker_command)
    p = sub.add_parser("beat", help="Celery beat with every periodic job (the same schedule as `celery -A "
                                    "worker.tasks beat`; run one per deployment)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=_beat_command)
