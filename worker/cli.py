"""The ``triage`` command line: with :mod:`worker.commands`, the one composition root that wires ``worker`` and
``train``.

Each command imports what it runs inside its function: ``triage --help`` and every other command start without
pydicom, SQLAlchemy or torch (tests/unit/test_cli.py checks it).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from worker.commands.passthrough import add_passthrough
from worker.config import load_settings
from worker.log_format import configure_logging

#: Modules that add their own subcommands: each has ``register(subparsers)``, setting ``func`` on its parsers.
FEATURE_COMMANDS: tuple[str, ...] = ("worker.commands.deliveries", "worker.commands.fairness",
                                     "worker.commands.reports", "worker.commands.publications")

#: Intake beyond C-STORE: `triage rules test`, `triage pull`, `triage backfill`, `triage pulls`.
FEATURE_COMMANDS += ("worker.commands.rules", "worker.commands.pulls")

#: `triage index rebuild|delete|stats`: the slice-embedding index of prior studies.
FEATURE_COMMANDS += ("worker.commands.slice_index",)

#: Training: `triage models list|promote|rollback|register|install`, `triage train nightly|worker|beat`.
FEATURE_COMMANDS += ("worker.commands.models", "worker.commands.training")

#: The top-level commands of feature modules, with their help lines: ``triage --help`` and the other commands list
#: them without importing the modules (pydicom, SQLAlchemy and the publishers at their tops: about a second); a
#: module is imported when one of its commands runs. A module of FEATURE_COMMANDS missing here is imported at
#: every start, as before. tests/unit/test_cli.py checks this against what the modules register.
FEATURE_COMMAND_INDEX: dict[str, tuple[str, str]] = {
    "deliveries": ("worker.commands.deliveries", "list undelivered results; retry dead-lettered ones"),
    "fairness": ("worker.commands.fairness", "turnaround and fairness: report, scheduled refresh, cohort"),
    "reports": ("worker.commands.reports", "final radiology reports: HL7 listener, relabelling"),
    "publications": ("worker.commands.publications", "list worklist priority publications; revert raises"),
    "rules": ("worker.commands.rules", "routing rules: test which rule files would match"),
    "pull": ("worker.commands.pulls", "retrieve one study from a PACS (C-MOVE, C-GET or WADO-RS)"),
    "backfill": ("worker.commands.pulls", ("retrieve every study of a date range from a PACS, throttled and "
                                          "resumable (run the same command again to resume)")),
    "pulls": ("worker.commands.pulls", "list pull jobs, or the studies of one"),
    "index": ("worker.commands.slice_index",
              "the slice-embedding index of prior studies (similar-study evidence, slice_knn)"),
    "models": ("worker.commands.models", "model registry: list, promote, roll back, register, install"),
    "train": ("worker.commands.training", "retraining: the nightly job, its worker and its schedule"),
}

#: ``triage bench NAME``: each benchmark is "module:function"; the function takes the remaining arguments and
#: prints a JSON line last.
BENCHMARKS: dict[str, str] = {
    "encoder": "models.bench_encoder:bench",
    "e2e": "worker.commands.bench_e2e:main",
    "ingest": "worker.bench_ingest:main",
    "preprocess": "worker.commands.bench_reference:main",
    "labeller": "train.labeller_eval:bench",
    "learn": "train.demo_model:bench",
    # MedImageInsight slice embeddings and the kNN evidence index (models/bench_slices.py)
    "embedder": "models.bench_slices:bench_embedder",
    "knn": "models.bench_slices:bench_knn",
}
#: One line per benchmark for ``triage bench --help`` (written here: importing a benchmark imports torch).
BENCHMARK_HELP: dict[str, str] = {
    "encoder": "study-encoder throughput at the published size (studies/s, TFLOP/s)",
    "e2e": "phantom studies through serve and workers as processes, under concurrent load",
    "ingest": "our DICOM receiver against dcmtk's storescp and Orthanc (images/s)",
    "preprocess": "DICOM folder to VQ-VAE input per study, against the Prima pipeline's (--compare-reference)",
    "labeller": "accuracy of the report labeller on the committed labelled sentences",
    "learn": "train the tiny demo model on phantoms (seconds per stage)",
    "embedder": "MedImageInsight slice-embedding throughput",
    "knn": "nearest-neighbour search over slice embeddings (queries/s, recall)",
}


def _upgrade_when_reachable(url: str) -> None:
    """Apply the migrations, waiting for a database that is not up yet (a restart during an outage): the receiver
    must come back by itself when the database does, not exit and leave the senders without a receiver."""
    import time

    from sqlalchemy.exc import OperationalError

    from sql.database import upgrade

    backoff = 1.0
    while True:
        try:
            upgrade(url)
            return
        except OperationalError as exc:
            print(f"triage: the database is not reachable ({str(exc).splitlines()[0]}); retrying in {backoff:.0f}s",
                  file=sys.stderr, flush=True)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


def _serve(args: argparse.Namespace) -> int:
    from worker.service import build_receiving_service

    settings = load_settings(args.config)
    _upgrade_when_reachable(settings.database_url)
    service = build_receiving_service(settings)
    service.start()
    print(f"triage: SCP {settings.scp.ae_title} listening on {settings.scp.host}:{service.scp.port}",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    service.stop()
    return 0


def _worker(args: argparse.Namespace) -> int:
    import os

    # The Celery app reads the settings when worker.tasks is imported: set them first.
    if args.config:
        os.environ["TRIAGE_CONFIG"] = args.config
    if args.metrics_port is not None:
        os.environ["TRIAGE_METRICS__WORKER_PORT"] = str(args.metrics_port)
    from worker.tasks import app

    argv = ["worker", "--pool", "solo", "--concurrency", "1", "--queues", args.queues, "--loglevel", args.loglevel,
            "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from sql.database import current_revision, upgrade

    settings = load_settings(args.config)
    url = args.url or settings.database_url
    upgrade(url)
    print(f"database at revision {current_revision(url)}")
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from train.phantoms.cli import main as phantoms_main

    return phantoms_main(args.rest, prog="triage phantoms") or 0


def _demo(args: argparse.Namespace) -> int:
    from worker.commands.demo import run_demo

    return run_demo(lesion=args.lesion, seed=args.seed, workdir=args.workdir, retrain=args.retrain)


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module, function = BENCHMARKS[args.name].split(":")
    return int(getattr(importlib.import_module(module), function)(args.rest) or 0)


def _api(args: argparse.Namespace) -> int:
    # FastAPI, uvicorn and the fairness analysis: only `triage api` loads them.
    from worker.api.server import serve
    from worker.commands.api import create_app

    return serve(args.config, api_tls_options(load_settings(args.config).api.tls.model_dump()), create_app)


def api_tls_options(tls: dict) -> dict:
    """uvicorn's HTTPS arguments from ``api.tls`` (empty: plain HTTP)."""
    import ssl

    if not tls.get("cert"):
        return {}
    if not tls.get("key"):
        raise ValueError("api.tls.cert needs api.tls.key")
    options = {"ssl_certfile": tls["cert"], "ssl_keyfile": tls["key"]}
    if tls.get("ca"):
        options["ssl_ca_certs"] = tls["ca"]
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED if tls.get("require_client_cert") else ssl.CERT_OPTIONAL
    elif tls.get("require_client_cert"):
        raise ValueError("api.tls.require_client_cert needs api.tls.ca")
    return options


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The CLI's parser. ``command``: the command that will run; the feature modules of other commands are
    listed from FEATURE_COMMAND_INDEX, not imported ("*", the default: every module imported)."""
    parser = argparse.ArgumentParser(prog="triage", description="PACS-integrated AI triage worker")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the DICOM receiver (C-STORE/C-ECHO SCP) and the study assembler")
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="run a Celery worker that processes studies")
    p.add_argument("--queues", default="neuro_mri,delivery",
                   help="comma-separated queues (default: neuro_mri,delivery)")
    p.add_argument("--hostname", help="Celery node name, e.g. gpu0@%%h")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this port")
    p.set_defaults(func=_worker)

    db = sub.add_parser("db", help="database administration").add_subparsers(dest="db_command", required=True)
    p = db.add_parser("upgrade", help="apply the schema migrations under sql/")
    p.add_argument("--url", help="database URL (default: from the configuration)")
    p.set_defaults(func=_db_upgrade)

    add_passthrough(sub, "phantoms", _phantoms, help="write synthetic brain-MRI phantom studies as DICOM",
                    global_options=True)

    p = sub.add_parser("demo", help="send a phantom study through the whole service and print its SR")
    p.add_argument("--lesion", default="subdural_haemorrhage")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workdir", default="var/demo", help="folder for the demo's database, store and outbox")
    p.add_argument("--retrain", action="store_true", help="train the demo model again even if one exists")
    p.set_defaults(func=_demo)

    p = sub.add_parser("api", help="serve the HTTP API and the worklist page")
    p.set_defaults(func=_api)

    bench = sub.add_parser("bench", help="run a benchmark; prints a JSON line last",
                           description="Run a benchmark; it prints a JSON line last. "
                                       "`triage bench NAME --help` shows the benchmark's options.")
    benchmarks = bench.add_subparsers(dest="name", required=True, metavar="NAME")
    for name in BENCHMARKS:
        add_passthrough(benchmarks, name, _bench, help=BENCHMARK_HELP.get(name, ""))

    import importlib

    indexed = {module for module, _ in FEATURE_COMMAND_INDEX.values()}
    wanted = FEATURE_COMMAND_INDEX.get(command or "", ("", ""))[0]
    for module in FEATURE_COMMANDS:
        if command == "*" or module == wanted or module not in indexed:
            importlib.import_module(module).register(sub)
        else:
            for name, (owner, help_line) in FEATURE_COMMAND_INDEX.items():
                if owner == module:
                    sub.add_parser(name, help=help_line, add_help=False)
    _accept_global_options_everywhere(parser)
    return parser


def _global_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--config", default=default(None),
                        help="YAML configuration (default: $TRIAGE_CONFIG or ./triage.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False), help="debug logging")
    parser.add_argument("--log-format", choices=("text", "json"), default=default("text"),
                        help="json: one JSON object per line, for log shippers")


def _accept_global_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``-v`` and ``--log-format`` also after the subcommand (``triage serve --config x.yaml``).

    On the subcommands they default to SUPPRESS, so a value given before the subcommand is not overwritten."""
    for action in parser._actions:  # argparse has no public walk over its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                if child.get_default("passthrough"):
                    continue
                if "--config" not in child._option_string_actions:
                    _global_options(child, suppress=True)
                _accept_global_options_everywhere(child)


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` that also lets subcommands made by ``add_passthrough`` have every argument."""
    args, unknown = parser.parse_known_args(argv)
    passthrough = getattr(args, "passthrough", None)
    if unknown and not passthrough:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if passthrough:
        # The unknown strings are the options before the first positional (see add_passthrough): in front again.
        args.rest = [*unknown, *args.rest]
    if passthrough == "global_options":
        ours = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        _global_options(ours, suppress=True)
        found, args.rest = ours.parse_known_args(args.rest)  # what it does not know stays, in order
        vars(args).update(vars(found))
    if args.config and not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    return args


def command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is neither an option nor an option's value)."""
    words = iter(argv)
    for word in words:
        if word in ("--config", "--log-format"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(build_parser(command_of(sys.argv[1:] if argv is None else argv)), argv)
    configure_logging(args.verbose, args.log_format)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
