"""``triage pull``, ``triage backfill`` and ``triage pulls``: retrieving studies from a PACS (:mod:`pacs_bridge.pull`).

Pulled studies are completed, routed and processed by ``triage serve`` like any other, so it must be running
(for C-MOVE it is also what receives the images). C-GET and WADO-RS results are stored by this command into the
same store and database, through the same checks.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import date, datetime

from sqlalchemy import func, select

from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.ingest import ingest
from pacs_bridge.pull import VIAS, DimseSource, Puller, PullError, configured_sources
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine
from sql.pull_schema import pull_items, pull_jobs
from worker.config import load_settings

#: Exit status of a backfill stopped before its end (run it again to resume).
EXIT_INTERRUPTED = 3


def register(subparsers) -> None:
    p = subparsers.add_parser("pull", help="retrieve one study from a PACS (C-MOVE, C-GET or WADO-RS)")
    p.add_argument("--study", required=True, help="StudyInstanceUID")
    p.add_argument("--via", choices=VIAS, default="cmove",
                   help="cmove: the PACS sends it to our SCP (default); cget: on our association; wado: WADO-RS")
    p.add_argument("--source", help="a name under pull.sources (default: the first that can do --via)")
    p.set_defaults(func=_pull)

    p = subparsers.add_parser("backfill", help="retrieve every study of a date range from a PACS, throttled and "
                                               "resumable (run the same command again to resume)")
    p.add_argument("--from", dest="first", required=True, type=_date, help="first study date, YYYY-MM-DD")
    p.add_argument("--to", dest="last", required=True, type=_date, help="last study date, YYYY-MM-DD")
    p.add_argument("--modality", action="append", default=[], help="only studies with this modality (repeatable)")
    p.add_argument("--via", choices=VIAS, default="cmove")
    p.add_argument("--source", help="a name under pull.sources (default: the first that can do --via)")
    p.add_argument("--pause", type=float, help="seconds between two studies (default: pull.pause_s)")
    p.add_argument("--new", action="store_true", help="start a new job instead of resuming an unfinished one")
    p.set_defaults(func=_backfill)

    p = subparsers.add_parser("pulls", help="list pull jobs, or the studies of one")
    p.add_argument("job", nargs="?", type=int)
    p.set_defaults(func=_list)


def _date(text: str) -> date:
    for layout in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text, layout).date()
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)")


class _Session:
    """The puller with its own store and bookkeeper (for C-GET/WADO-RS), stopped cleanly on exit."""

    def __init__(self, args: argparse.Namespace, pause_s: float | None = None) -> None:
        settings = load_settings(args.config)
        pull = settings.pull
        self.engine = make_engine(settings.database_url)
        self.store = InstanceStore(settings.incoming_dir, settings.quarantine_dir,
                                   fsync=bool(settings.store.fsync))
        self.bookkeeper = Bookkeeper(self.engine, quarantine_file=self.store.quarantine_file)
        self.bookkeeper.start()
        self.stop = threading.Event()
        calling_aet = pull.calling_aet or settings.scp.ae_title

        def receive_factory(source, how):
            calling = source.ae_title if isinstance(source, DimseSource) else None
            peer = source.host if isinstance(source, DimseSource) else source.url.split("/")[2]

            def receive(data: bytes):
                return ingest(data, self.store, self.bookkeeper, source=how, calling_aet=calling,
                              called_aet=calling_aet if calling else None, peer_address=peer)

            return receive

        self.puller = Puller(
            self.engine, configured_sources(pull.sources), calling_aet=calling_aet,
            move_destination=pull.move_destination or settings.scp.ae_title,
            receive_factory=receive_factory, wait_recorded=lambda: self.bookkeeper.wait_idle(120),
            pause_s=float(pull.pause_s if pause_s is None else pause_s),
            query_window_days=int(pull.query_window_days), timeout_s=float(pull.timeout_s),
            stop=self.stop, report=lambda line: print(line, flush=True),
        )

    def __enter__(self) -> "_Session":
        def on_signal(signum, _frame):
            if self.stop.is_set():  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            print("stopping after the study in hand (again to stop now); run the same command to resume",
                  flush=True)
            self.stop.set()

        self._previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self.bookkeeper.stop()
        self.engine.dispose()


def _pull(args: argparse.Namespace) -> int:
    try:
        with _Session(args) as session:
            job_id = session.puller.pull_job(args.study, args.via, args.source)
            summary = session.puller.run(job_id)
    except (PullError, ValueError) as exc:
        print(f"triage pull: {exc}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0 if summary.status == "done" else 1


def _backfill(args: argparse.Namespace) -> int:
    try:
        with _Session(args, args.pause) as session:
            job_id, resumed = session.puller.backfill_job(args.first, args.last, args.modality, args.via,
                                                          args.source, resume=not args.new)
            if resumed:
                print(f"resuming pull job {job_id}: {session.puller.summary(job_id).line()}", flush=True)
            summary = session.puller.run(job_id)
    except (PullError, ValueError) as exc:
        print(f"triage backfill: {exc}", file=sys.stderr)
        return 1
    print(summary.line())
    if summary.status == "interrupted":
        return EXIT_INTERRUPTED
    return 0 if summary.status == "done" else 1


def _list(args: argparse.Namespace) -> int:
    engine = make_engine(load_settings(args.config).database_url)
    with engine.connect() as connection:
        if args.job is None:
            jobs = connection.execute(select(pull_jobs).order_by(pull_jobs.c.id)).all()
            if not jobs:
                print("no pull jobs")
            counts = connection.execute(select(pull_items.c.job_id, pull_items.c.status, func.count())
                                        .group_by(pull_items.c.job_id, pull_items.c.status)).all()
            by_job: dict[int, list[str]] = {}
            for job_id, state, n in counts:
                by_job.setdefault(job_id, []).append(f"{n} {state}")
            for job in jobs:
                print(f"{job.id:>4}  {job.kind:<8} {job.via:<5} {job.source:<12} {job.status:<11} "
                      f"{', '.join(sorted(by_job.get(job.id, []))) or '-':<30} {job.query}")
        else:
            for item in connection.execute(select(pull_items).where(pull_items.c.job_id == args.job)
                                           .order_by(pull_items.c.study_date, pull_items.c.id)):
                print(f"{item.study_instance_uid:<64} {item.study_date or '-':<8} {item.status:<10} "
                      f"tries {item.attempts}  instances {item.instances_received if item.instances_received is not None else '-'}"
                      f"  {item.error or ''}")
    engine.dispose()
    return 0
