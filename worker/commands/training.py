"""``triage train nightly | worker | beat``: the nightly retraining from the command line, the training worker and
the deployment's beat.

The tasks themselves are :mod:`worker.commands.jobs`; ``triage train nightly`` runs the job once, now, in this
process.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

from rich.console import Console

from sql.database import make_engine
from worker.celery_app import TRAINING_QUEUE
from worker.commands.jobs import rebuild_vector_index, training_app
from worker.commands.train_settings import nightly_config
from worker.config import load_settings


def _nightly_command(args: argparse.Namespace) -> int:
    # torch (the heads' retraining): only this command of the group needs it.
    from train.nightly import run_nightly

    settings = load_settings(args.config)
    config = nightly_config(settings)
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
    settings = load_settings(args.config)
    app = training_app(settings)
    port = int(settings.fairness.metrics_port)
    if port:  # the gauges the scheduled fairness refresh sets in this process
        from prometheus_client import start_http_server

        start_http_server(port, addr=settings.metrics.host)
    app.worker_main(["worker", "--pool", "solo", "--concurrency", "1", "--queues", TRAINING_QUEUE,
                     "--loglevel", args.loglevel, "--without-gossip", "--without-mingle"])
    return 0


def _beat_command(args: argparse.Namespace) -> int:
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
