"""``triage demo``: one phantom study through the whole service, on the embedded defaults, shown as it happens.

Nothing is simulated: the study is written as DICOM files, sent over a real association to the real SCP, completed
by the assembler, processed by a Celery worker process (filesystem broker), encoded as an SR and read back from
the outbox. The model is the tiny demo bundle trained on phantoms by ``train.demo_model``; the demo says which
weights it used and how they were made.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy import select

from pacs_bridge.dicom_send import DicomDestination, c_store
from pacs_bridge.sr import read_sr
from sql.database import make_engine, upgrade
from sql.schema import processing_runs, studies
from train.demo_model import ensure_demo_bundle
from train.phantoms import LESIONS, write_phantom_study
from worker.config import load_settings
from worker.processes import stop_process_groups
from worker.service import build_receiving_service

REPO = Path(__file__).resolve().parents[2]
STAGES = ("receiving", "queued", "processing", "done")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(lesion: str = "subdural_haemorrhage", seed: int = 7, workdir: str | Path = "var/demo",
             retrain: bool = False) -> int:
    console = Console()
    # The demo shows its own progress; the service's INFO logs (migrations, series splits) would bury it.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    if lesion not in LESIONS:
        console.print(f"[red]unknown lesion {lesion!r}; choose one of {', '.join(LESIONS)}")
        return 2
    workdir = Path(workdir).resolve()
    run_dir = workdir / time.strftime("run-%Y%m%d-%H%M%S")
    bundle_dir, provenance = ensure_demo_bundle(workdir / "bundle", retrain=retrain, console=console)
    console.rule("[bold]triage demo")
    console.print(f"Model bundle: [cyan]{bundle_dir}[/]\n  {provenance}")

    config = {
        "var_dir": str(run_dir / "var"),
        "scp": {"port": _free_port(), "allowed_calling_aets": ["DEMO_MR"]},
        "assembly": {"quiet_period_s": 2.0, "poll_interval_s": 0.5},
        "model": {"bundle": str(bundle_dir), "device": "auto"},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "triage.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings = load_settings(config_path, environ={})
    upgrade(settings.database_url)

    with console.status("Writing a phantom brain-MRI study as DICOM..."):
        study = write_phantom_study(run_dir / "study", lesion=lesion, seed=seed)
    console.print(f"Phantom study [cyan]{study.study_instance_uid}[/]: {len(study.files)} images in "
                  f"{len(study.series)} series ({', '.join(sorted(set(study.series.values())))}); planted: "
                  f"[bold]{study.truth.lesion}[/]" + (f" ({study.truth.side})" if study.truth.side else ""))


    service = build_receiving_service(settings)
    service.start()
    env = {**os.environ, "TRIAGE_CONFIG": str(config_path)}
    worker_log = run_dir / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--loglevel", "WARNING"],
                              cwd=REPO, env=env, stdout=worker_log.open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        destination = DicomDestination("triage", "127.0.0.1", service.scp.port, settings.scp.ae_title)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("Sending over DICOM (C-STORE)", total=len(study.files))
            # One association per series, as a modality sends.
            by_series: dict[str, list[Path]] = {}
            for path in study.files:
                by_series.setdefault(path.parent.name, []).append(path)
            for paths in by_series.values():
                c_store(destination, [pydicom.dcmread(p) for p in paths], calling_aet="DEMO_MR")
                progress.advance(task, len(paths))
        sent_at = time.monotonic()

        engine = make_engine(settings.database_url)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("Waiting for the study to complete (quiet period)")
            run = None
            while True:
                if worker.poll() is not None:
                    console.print(f"[red]the worker stopped; its log:\n{worker_log.read_text()[-3000:]}")
                    return 1
                with engine.connect() as c:
                    status = c.execute(select(studies.c.status).where(
                        studies.c.study_instance_uid == study.study_instance_uid)).scalar()
                    run = c.execute(select(processing_runs).order_by(processing_runs.c.id.desc())).first()
                labels = {"receiving": "Waiting for the study to complete (quiet period)",
                          "queued": "Queued for the worker (first start loads the model)",
                          "processing": "Worker is processing: volumes, tokens, VQ-VAE, ViT, heads, SR"}
                if run is not None and run.status in ("done", "failed", "not_analysed"):
                    break
                progress.update(task, description=labels.get(status or "receiving", str(status)))
                if time.monotonic() - sent_at > 600:
                    console.print("[red]no result after 10 minutes; see " + str(worker_log))
                    return 1
                time.sleep(0.3)
        engine.dispose()
    finally:
        stop_process_groups(worker)
        service.stop()

    if run.status != "done":  # failed, or not analysed by the input gate (the error says why)
        console.print(f"[red]processing failed: {run.error}")
        return 1

    sr = pydicom.dcmread(run.sr_path)
    result = read_sr(sr)
    turnaround = (run.sr_created_at - run.last_image_at).total_seconds()
    console.rule("[bold]Structured report")
    console.print(f"SR {sr.SOPInstanceUID} ({sr.SOPClassUID.name}) written to {run.sr_path}")
    console.print(f"Model: {result.model_name} {result.model_version}")
    colour = {"stat": "bold red", "urgent": "yellow", "routine": "green"}[result.priority]
    console.print(f"Worklist priority: [{colour}]{result.priority.upper()}[/]   "
                  f"Referral: {', '.join(result.referrals) or 'none'}")
    table = Table("Finding", "Probability", "Threshold", "Called")
    for finding in result.findings:
        table.add_row(finding.label, f"{finding.probability:.3f}", f"{finding.threshold:.3f}",
                      "yes" if finding.positive else "")
    console.print(table)
    console.print(f"Planted in the phantom: {study.truth.lesion} -> {', '.join(study.truth.labels) or 'no finding'}")
    console.print(f"AI turnaround (last image received -> SR written): {turnaround:.1f} s "
                  f"(includes the worker's first model load)")
    return 0
