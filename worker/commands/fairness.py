"""``triage fairness``: the report, a refresh now, and the synthetic cohort; and the fairness analysis the API
serves (:class:`TrainFairness`, given to :func:`worker.api.app.create_app` by :mod:`worker.commands.api`).

The scheduled refresh is the beat's ``fairness-refresh`` entry, run by the training worker
(:mod:`worker.commands.jobs`); ``triage fairness refresh`` runs one now.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sqlalchemy.engine import Connection, Engine

from pacs_bridge.study_attributes import AttributePolicy
from sql.database import make_engine, upgrade
from train.fairness.agreement import agreement_by_group, render_agreement_html
from train.fairness.analysis import FairnessResults, analyse, headline
from train.fairness.cohort import load_cohort_csv, load_cohort_db, write_cohort_db
from train.fairness.make_cohort import DEFAULT_OUT
from train.fairness.make_cohort import main as make_cohort_main
from train.fairness.metrics import publish
from train.fairness.report import render_html
from train.fairness.store import load_latest, refresh
from worker.commands.jobs import fairness_report_path
from worker.commands.passthrough import add_passthrough
from worker.commands.train_settings import fairness_config
from worker.config import Settings, load_settings


class TrainFairness:
    """The fairness analysis, as the API's fairness pages use it (``worker.api.fairness.FairnessAnalysis``)."""

    def __init__(self, settings: Settings) -> None:
        fairness = settings.fairness
        self.config = fairness_config(fairness)
        self.policy = AttributePolicy.from_settings(fairness.model_dump())

    def latest(self, connection: Connection) -> FairnessResults | None:
        return load_latest(connection)

    def page(self, connection: Connection, results: FairnessResults) -> str:
        """The report page of ``results``, with the radiologists' agreement with the AI by group at its end."""
        agreement = render_agreement_html(agreement_by_group(connection))
        page = render_html(results, load_cohort_db(connection))
        return page.replace("</body></html>", agreement + "\n</body></html>")

    def agreement(self, connection: Connection) -> list:
        return agreement_by_group(connection)

    def headline(self, results: FairnessResults) -> dict:
        return headline(results)

    def refresh(self, engine: Engine) -> FairnessResults:
        """Analyse the database now, store the results and set the Prometheus gauges."""
        results = refresh(engine, self.config, self.policy)
        publish(results, time.time())
        return results


def write_report(settings: Settings, url: str, refresh_first: bool, out: Path) -> dict:
    """Render the latest stored results (refreshing first if asked or if there are none) to ``out``."""
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            results = None if refresh_first else load_latest(connection)
        if results is None:
            refresh(engine, fairness_config(settings.fairness), AttributePolicy.from_settings(settings.fairness.model_dump()))
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
    out = Path(args.out) if args.out else fairness_report_path(settings)
    if args.cohort:
        cohort = load_cohort_csv(args.cohort)
        results = analyse(cohort, fairness_config(settings.fairness))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(results, cohort))
        summary = headline(results)
    else:
        summary = write_report(settings, args.url or settings.database_url, args.refresh, out)
    print(json.dumps({"report": str(out), **summary}))
    return 0


def _refresh(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    url = args.url or settings.database_url
    upgrade(url)
    engine = make_engine(url)
    try:
        results = TrainFairness(settings).refresh(engine)
    finally:
        engine.dispose()
    summary = write_report(settings, url, False, fairness_report_path(settings)) if args.report else headline(results)
    print(json.dumps({"refresh_id": results.refresh_id, **summary}), flush=True)
    return 0


def _load_cohort(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    url = args.url or settings.database_url
    upgrade(url)
    engine = make_engine(url)
    count = write_cohort_db(engine, args.cohort or DEFAULT_OUT)
    engine.dispose()
    print(json.dumps({"loaded_studies": count}))
    return 0


def _make_cohort(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    return make_cohort_main(args.rest, prog="triage fairness make-cohort",
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
    p = commands.add_parser("refresh", help="analyse the database and store the results now (the scheduled "
                                            "refresh is the beat's, run by `triage train worker`)")
    p.add_argument("--report", action="store_true", help="also write the HTML report")
    p.add_argument("--url", help="database URL (default: from the configuration)")
    p.set_defaults(func=_refresh)
    p = commands.add_parser("load-cohort", help="load a cohort CSV into the database (demonstration, tests)")
    p.add_argument("cohort", nargs="?", help="default: train/data/synthetic_cohort.csv")
    p.add_argument("--url", help="database URL (default: from the configuration)")
    p.set_defaults(func=_load_cohort)
    add_passthrough(commands, "make-cohort", _make_cohort,
                    help="write the seeded synthetic cohort with planted effects (default: <var_dir>/fairness/)",
                    global_options=True)
