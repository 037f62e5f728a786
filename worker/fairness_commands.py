"""``triage fairness``: the report, the scheduled refresh, and the synthetic cohort."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from pathlib import Path

from worker.config import Settings, load_settings

log = logging.getLogger(__name__)


def report_path(settings: Settings) -> Path:
    return Path(settings.fairness.report_path or settings.var_dir / "fairness" / "report.html")


def write_report(settings: Settings, url: str, refresh_first: bool, out: Path) -> dict:
    """Render the latest stored results (refreshing first if asked or if there are none) to ``out``."""
    from pacs_bridge.schema import make_engine
    from pacs_bridge.study_attributes import AttributePolicy
    from train.fairness.analysis import FairnessConfig, headline
    from train.fairness.cohort import load_cohort_db
    from train.fairness.report import render_html
    from train.fairness.store import load_latest, refresh
    from worker.database import upgrade

    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            results = None if refresh_first else load_latest(connection)
        if results is None:
            refresh(engine, FairnessConfig.from_settings(settings.fairness.model_dump()),
                    AttributePolicy.from_settings(settings.fairness.model_dump()))
        with engine.connect() as connection:
            results = load_latest(connection)
            cohort = load_cohort_db(connection)
    finally:
        engine.dispose()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(results, cohort))
    return headline(results)


def _report(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    out = Path(args.out) if args.out else report_path(settings)
    if args.cohort:
        from train.fairness.analysis import FairnessConfig, analyse, headline
        from train.fairness.cohort import load_cohort_csv
        from train.fairness.report import render_html

        cohort = load_cohort_csv(args.cohort)
        results = analyse(cohort, FairnessConfig.from_settings(settings.fairness.model_dump()))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(results, cohort))
        summary = headline(results)
    else:
        summary = write_report(settings, args.url or settings.database_url, args.refresh, out)
    print(json.dumps({"report": str(out), **summary}))
    return 0


def _refresh(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from pacs_bridge.schema import make_engine
    from pacs_bridge.study_attributes import AttributePolicy
    from train.fairness.analysis import FairnessConfig, headline
    from train.fairness.metrics import publish
    from train.fairness.store import refresh as refresh_once
    from train.fairness.store import run_schedule
    from worker.database import upgrade

    settings = load_settings(args.config)
    fairness = settings.fairness
    url = args.url or settings.database_url
    upgrade(url)
    engine = make_engine(url)
    config, policy = FairnessConfig.from_settings(fairness), AttributePolicy.from_settings(fairness)
    interval = float(args.every if args.every is not None else fairness.refresh_interval_s)
    port = int(args.metrics_port if args.metrics_port is not None else fairness.metrics_port)
    if port and interval:
        start_http_server(port, addr=settings.api.host)

    def once() -> None:
        results = refresh_once(engine, config, policy)
        publish(results, time.time())
        summary = write_report(settings, url, False, report_path(settings)) if args.report else headline(results)
        print(json.dumps({"refresh_id": results.refresh_id, **summary}), flush=True)

    if not interval:
        once()
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_schedule(once, interval, stop.is_set)
    return 0


def _load_cohort(args: argparse.Namespace) -> int:
    from pacs_bridge.schema import make_engine
    from train.fairness.cohort import write_cohort_db
    from train.fairness.make_cohort import DEFAULT_OUT
    from worker.database import upgrade

    settings = load_settings(args.config)
    url = args.url or settings.database_url
    upgrade(url)
    engine = make_engine(url)
    count = write_cohort_db(engine, args.cohort or DEFAULT_OUT)
    engine.dispose()
    print(json.dumps({"loaded_studies": count}))
    return 0


def _make_cohort(args: argparse.Namespace) -> int:
    from train.fairness.make_cohort import main

    settings = load_settings(args.config)
    return main(args.rest, prog="triage fairness make-cohort",
                default_out=settings.var_dir / "fairness" / "synthetic_cohort.csv")


def register(subparsers) -> None:
    parser = subparsers.add_parser("fairness", help="turnaround and fairness: report, scheduled refresh, cohort")
    commands = parser.add_subparsers(dest="fairness_command", required=True)
    p = commands.add_parser("report", help="write the HTML report (latest stored results, or a cohort CSV)")
    p.add_argument("--cohort", help="analyse this cohort CSV instead of the database (nothing is stored)")
    p.add_argument("--out", help="HTML file to write (default: fairness.report_path)")
    p.add_argument("--refresh", action="store_true", help="refresh the stored results first")
    p.add_argument("--url", help="database URL (default: from the configuration)")
    p.set_defaults(func=_report)
    p = commands.add_parser("refresh", help="analyse the database and store the results, once or on a schedule")
    p.add_argument("--every", type=float, help="seconds between refreshes; 0 runs once (default: "
                                                "fairness.refresh_interval_s)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here (default: fairness.metrics_port)")
    p.add_argument("--report", action="store_true", help="also write the HTML report after each refresh")
    p.add_argument("--url", help="database URL (default: from the configuration)")
    p.set_defaults(func=_refresh)
    p = commands.add_parser("load-cohort", help="load a cohort CSV into the database (demonstration, tests)")
    p.add_argument("cohort", nargs="?", help="default: train/data/synthetic_cohort.csv")
    p.add_argument("--url", help="database URL (default: from the configuration)")
    p.set_defaults(func=_load_cohort)
    from worker.cli import add_passthrough

    add_passthrough(commands, "make-cohort", _make_cohort,
                    help="write the seeded synthetic cohort with planted effects (default: <var_dir>/fairness/)",
                    global_options=True)
