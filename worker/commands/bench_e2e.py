"""``triage bench e2e``: phantom studies through the whole service, as processes, under concurrent load.

``triage serve`` and one or more ``triage worker`` processes run as in production, on the configured database
and broker. Studies are sent by dcmtk's storescu, ``--associations`` at a time (one association per study, as a
modality sends). Each worker gets a host name of its own (a UTS namespace via ``unshare`` when run as root,
else a distinct Celery node name), so several "hosts" share one broker and one database.

Reported: studies per hour (first image sent to last SR written), the AI turnaround (last image received to SR
acknowledged; it includes the completion quiet period, reported beside it), the processing time (run queued to
finished), how the runs were split between hosts, and whether every study was processed exactly once.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import yaml
from pydicom.uid import generate_uid
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import create_engine, func, select

from sql.database import upgrade
from sql.schema import as_utc, processing_runs, studies
from train.phantoms import LESIONS, write_phantom_study
from worker.commands.bench_reference import add_reference_options, compare
from worker.processes import stop_process_groups

REPO = Path(__file__).resolve().parents[2]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clone_study(source: Path, target: Path, index: int) -> Path:
    """A copy of a study with new Study/Series/SOP UIDs: distinct studies at the cost of a file copy."""
    study_uid = generate_uid(entropy_srcs=[str(source), str(index), "study"])
    for path in sorted(source.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        series_uid = generate_uid(entropy_srcs=[study_uid, str(ds.SeriesInstanceUID)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[study_uid, str(ds.SOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"LOAD{index:06d}"
        out = target / study_uid / series_uid
        out.mkdir(parents=True, exist_ok=True)
        ds.save_as(out / path.name, enforce_file_format=True)
    return target / study_uid


def make_studies(folder: Path, count: int, series: list[str] | None) -> list[Path]:
    bases = [write_phantom_study(folder / "base", lesion=LESIONS[i % len(LESIONS)], seed=100 + i, series=series).folder
             for i in range(min(count, len(LESIONS)))]
    return [clone_study(bases[i % len(bases)], folder / "load", i) for i in range(count)]


def _worker_command(name: str, isolate_hosts: bool) -> list[str]:
    command = [sys.executable, "-m", "worker.cli", "worker", "--hostname", f"{name}@{name}", "--loglevel", "WARNING"]
    if isolate_hosts:
        # A UTS namespace of its own: socket.gethostname() in that worker is `name`, as on a separate machine.
        return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *command]
    return command


def _can_isolate_hosts() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode == 0


def run_load(workdir: Path, study_folders: list[Path], *, database_url: str, broker_url: str, bundle: Path,
             workers: int = 2, associations: int = 4, quiet_period_s: float = 1.0, timeout_s: float = 1800,
             show_progress: bool = True, explain: bool = True) -> dict:
    """Run the service, send every study, wait for all results; returns the figures and the exactly-once check."""
    upgrade(database_url)
    scp_port = _free_port()
    config = {
        "var_dir": str(workdir / "var"), "database": {"url": database_url}, "broker": {"url": broker_url},
        "scp": {"port": scp_port, "max_associations": max(associations * 2, 10)},
        "metrics": {"serve_port": 0},
        "assembly": {"quiet_period_s": quiet_period_s, "poll_interval_s": 0.25},
        # The workers share the cores: each one's model pass gets its share (more threads than cores in all
        # is many times slower on a CPU).
        "model": {"bundle": str(bundle), "device": "auto", "cpu_threads": max(1, (os.cpu_count() or 1) // workers)},
        "explain": {"enabled": explain},
    }
    config_path = workdir / "triage.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "TRIAGE_CONFIG": str(config_path)}
    isolate = _can_isolate_hosts()
    processes = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        log = (workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        processes.append(process)
        return process

    engine = create_engine(database_url)
    try:
        serve = start("serve", [sys.executable, "-m", "worker.cli", "serve"])
        deadline = time.monotonic() + 120
        while b"listening" not in (workdir / "serve.log").read_bytes():
            if serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SCP did not start: {(workdir / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.1)
        for index in range(workers):
            start(f"host{index}", _worker_command(f"host{index}", isolate))

        def send(folder: Path) -> None:
            result = subprocess.run(["storescu", "-aet", "LOADTEST", "-aec", "TRIAGE", "+sd", "+r", "127.0.0.1",
                                     str(scp_port), str(folder)], capture_output=True, text=True, env=DCMTK_ENV,
                                    timeout=600)
            if result.returncode != 0:
                raise RuntimeError(f"storescu failed for {folder.name}: {result.stderr[-500:]}")

        started = time.time()
        wait_until = time.monotonic() + timeout_s
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not show_progress, transient=True) as progress:
            sending = progress.add_task("sending", total=len(study_folders))
            done_task = progress.add_task("processed", total=len(study_folders))
            with concurrent.futures.ThreadPoolExecutor(associations) as pool:
                futures = [pool.submit(send, folder) for folder in study_folders]
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    progress.advance(sending)
            while True:
                with engine.connect() as c:
                    finished = c.execute(select(func.count()).select_from(processing_runs)
                                         .where(processing_runs.c.status.in_(("done", "failed", "not_analysed")))).scalar_one()
                progress.update(done_task, completed=finished)
                if finished >= len(study_folders):
                    break
                if time.monotonic() > wait_until:
                    raise TimeoutError(f"{finished} of {len(study_folders)} studies finished in time")
                if any(p.poll() is not None for p in processes):
                    raise RuntimeError("a service process stopped; see the logs in " + str(workdir))
                time.sleep(0.5)
        with engine.connect() as c:
            runs = c.execute(select(processing_runs)).all()
            study_rows = c.execute(select(studies.c.id, studies.c.study_instance_uid)).all()
    finally:
        stop_process_groups(*processes, grace_s=30)
        engine.dispose()

    done = [r for r in runs if r.status == "done"]
    tat = sorted((as_utc(r.delivered_at or r.finished_at) - as_utc(r.last_image_at)).total_seconds() for r in done)
    # A run taken into another run's batch may not have been handed to the broker yet: count from its start.
    processing = sorted((as_utc(r.finished_at) - as_utc(r.queued_at or r.started_at)).total_seconds() for r in done)
    elapsed = max(as_utc(r.finished_at).timestamp() for r in done) - started if done else 0.0
    runs_per_study = {row.id: 0 for row in study_rows}
    for r in runs:
        runs_per_study[r.study_id] = runs_per_study.get(r.study_id, 0) + 1
    hosts: dict[str, int] = {}
    for r in done:
        host = (r.worker_host or "?").rsplit(":", 1)[0]
        hosts[host] = hosts.get(host, 0) + 1
    sr_files = len(list((workdir / "var" / "outbox").rglob("*.dcm")))
    # Where a run's time went (the worker's own stage timings), to see what a change moved.
    stage_values: dict[str, list[float]] = {}
    for r in done:
        for stage, seconds in (r.timings or {}).items():
            if stage.endswith("_s"):
                stage_values.setdefault(stage, []).append(float(seconds))

    def percentile(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1]) if len(values) > 1 else values[0]

    return {
        "studies": len(study_folders),
        "images": sum(len(list(f.rglob("*.dcm"))) for f in study_folders),
        "associations": associations,
        "workers": workers,
        "hosts_isolated": isolate,
        "runs_by_host": hosts,
        "exactly_once": all(n == 1 for n in runs_per_study.values()) and len(runs_per_study) == len(study_folders)
        and len(done) == len(study_folders) and sr_files == len(study_folders),
        "failed": sum(1 for r in runs if r.status == "failed"),
        "sr_files": sr_files,
        "studies_per_hour": round(len(done) / elapsed * 3600, 1) if elapsed > 0 else 0.0,
        "tat_p50_s": round(percentile(tat, 50), 3),
        "tat_p95_s": round(percentile(tat, 95), 3),
        "quiet_period_s": quiet_period_s,
        "processing_p50_s": round(percentile(processing, 50), 3),
        "processing_p95_s": round(percentile(processing, 95), 3),
        "stages_p50_s": {stage: round(statistics.median(v), 3) for stage, v in sorted(stage_values.items())},
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="triage bench e2e")
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--series", nargs="*", default=None,
                        help="phantom series per study (default: the fast set: FLAIR, DWI, ADC)")
    parser.add_argument("--quiet-period", type=float, default=1.0)
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--bundle", help="model bundle (default: a tiny bundle with random weights)")
    parser.add_argument("--no-explain", action="store_true", help="skip LIME regions (slow on a CPU)")
    parser.add_argument("--reference-studies", type=int, default=2,
                        help="with --compare-reference: how many of the studies both preprocessings run on")
    parser.add_argument("--reference-repeats", type=int, default=3)
    add_reference_options(parser)
    args = parser.parse_args(argv)
    if shutil.which("storescu") is None:
        print("storescu is not installed (run ops/setup.sh)", file=sys.stderr)
        return 2
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="triage-bench-e2e-") as tmp:
        work = Path(tmp)
        bundle = Path(args.bundle) if args.bundle else _random_bundle(work / "bundle")
        if args.broker_url.startswith("redis"):
            import redis

            redis.Redis.from_url(args.broker_url).flushdb()
        folders = make_studies(work / "studies", args.studies, args.series)
        figures = run_load(work, folders, database_url=args.database_url or f"sqlite:///{work / 'bench.db'}",
                           broker_url=args.broker_url, bundle=bundle, workers=args.workers,
                           associations=args.associations, quiet_period_s=args.quiet_period,
                           explain=not args.no_explain)
        if args.compare_reference:
            figures["reference_comparison"] = compare_with_reference(
                folders[: max(1, args.reference_studies)], figures["studies_per_hour"],
                args.compare_reference, args.reference_python, args.reference_repeats)
    figures["device"] = device
    figures["model"] = "given bundle" if args.bundle else "tiny, random weights"
    figures["explain"] = not args.no_explain
    print(json.dumps(figures))
    return 0 if figures["exactly_once"] else 1


def compare_with_reference(folders: list[Path], studies_per_hour: float, checkout: Path, python: str,
                           repeats: int) -> dict:
    """Both preprocessings on some of the load's studies, after the load (so that they do not compete).

    The reference pipeline has no service: its best rate on this machine is one process per core, each doing
    one study per preprocessing time, models left out (its tokenizer and Prima passes need weights it fetches
    by hand); ``studies_per_hour_ratio`` divides ours, models included, by that bound.
    """
    figures = compare(folders, repeats=repeats, checkout=checkout, python=python)
    cores = os.cpu_count() or 1
    reference_per_hour = 3600 / figures["reference_preprocess_s"] * cores
    return {
        **figures,
        "reference_studies_per_hour_bound": round(reference_per_hour, 1),
        "reference_bound": f"{cores} processes (one per core), preprocessing alone (DICOM folder to VQ-VAE "
                           "input), models left out",
        "studies_per_hour_ratio": round(studies_per_hour / reference_per_hour, 2),
    }


def _random_bundle(folder: Path) -> Path:
    from models.bundle import random_bundle, save_bundle

    bundle = random_bundle("tiny", seed=0)
    save_bundle(folder, bundle.vqvae, bundle.prima, bundle.manifest)
    return folder
