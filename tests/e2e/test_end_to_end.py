"""The whole path with real parts: storescu -> our SCP -> Redis -> a Celery worker process -> SR -> Orthanc.

The database is a fresh PostgreSQL database, the broker a real Redis, the destination a real Orthanc, the sender
dcmtk's storescu. The model is a tiny bundle with random weights: this test is about the service, not accuracy.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import yaml
from sqlalchemy import create_engine, func, select

from sql.schema import deliveries, instances, predictions, processing_runs, studies
from tests.support.processes import REPO, free_port, start_process, wait_for
from worker.processes import stop_process_groups

pytestmark = [pytest.mark.slow, pytest.mark.needs_dcmtk]

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def phantom_study(tmp_path_factory):
    from train.phantoms import write_phantom_study

    return write_phantom_study(tmp_path_factory.mktemp("phantom"), lesion="subdural_haemorrhage", seed=11)


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return start_process([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=env,
                         stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)




def test_study_sent_by_storescu_comes_back_as_a_valid_sr_in_orthanc(
    tmp_path, postgres_url, redis_url, orthanc, tiny_bundle, phantom_study
):
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk is not installed (run ops/setup.sh)")
    scp_port, serve_metrics, worker_metrics = free_port(), free_port(), free_port()
    config = {
        "var_dir": str(tmp_path / "var"),
        "database": {"url": postgres_url},
        "broker": {"url": redis_url},
        "scp": {"port": scp_port, "allowed_calling_aets": ["MODALITY"]},
        "metrics": {"serve_port": serve_metrics},
        "assembly": {"quiet_period_s": 2, "poll_interval_s": 0.5},
        "model": {"bundle": str(tiny_bundle), "device": "cpu"},
        "destinations": [{"name": "orthanc", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                          "ae_title": orthanc.aet}],
    }
    config_path = tmp_path / "triage.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "TRIAGE_CONFIG": str(config_path)}
    serve = _start(["serve"], env, tmp_path / "serve.log")
    worker = _start(["worker", "--hostname", "e2e@localhost", "--loglevel", "INFO", "--metrics-port",
                     str(worker_metrics)], env, tmp_path / "worker.log")
    try:
        wait_for(lambda: b"listening" in (tmp_path / "serve.log").read_bytes() or serve.poll() is not None, 60,
                 what="the SCP to listen")
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()
        sent = subprocess.run(
            ["storescu", "-aet", "MODALITY", "-aec", "TRIAGE", "+sd", "+r", "127.0.0.1", str(scp_port),
             str(phantom_study.folder)],
            capture_output=True, text=True, env=DCMTK_ENV, timeout=120,
        )
        assert sent.returncode == 0, sent.stderr

        def sr_in_orthanc():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-5000:]
            return orthanc.find_instances(Modality="SR", StudyInstanceUID=phantom_study.study_instance_uid)

        found = wait_for(sr_in_orthanc, 300, interval=1, what="the SR to arrive in Orthanc")
        assert len(found) == 1
        sr_bytes = orthanc.get(f"/instances/{found[0]}/file")

        # What operations sees: both processes ready, the receiver's and the worker's counts in /metrics.
        for port in (serve_metrics, worker_metrics):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
                assert json.loads(response.read())["ready"] is True
        with urllib.request.urlopen(f"http://127.0.0.1:{serve_metrics}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        assert f"triage_images_received_total {float(len(phantom_study.files))}" in scraped
        assert 'triage_queue_depth{queue="neuro_mri"}' in scraped
        with urllib.request.urlopen(f"http://127.0.0.1:{worker_metrics}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        assert 'triage_runs_total{outcome="done",pipeline="neuro_mri"} 1.0' in scraped
        assert phantom_study.study_instance_uid not in scraped
    finally:
        stop_process_groups(serve, worker)

    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(sr_bytes)
    sr = hd.sr.srread(sr_path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.StudyInstanceUID == phantom_study.study_instance_uid
    from pacs_bridge.sr import read_sr

    result = read_sr(pydicom.dcmread(io.BytesIO(sr_bytes)))
    assert result.study_instance_uid == phantom_study.study_instance_uid
    assert result.priority in ("routine", "urgent", "stat") and result.findings

    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors

    engine = create_engine(postgres_url)
    with engine.connect() as c:
        study = c.execute(select(studies)).one()
        run = c.execute(select(processing_runs)).one()
        n_instances = c.execute(select(func.count()).select_from(instances)).scalar_one()
        n_predictions = c.execute(select(func.count()).select_from(predictions).where(
            predictions.c.kind == "diagnosis")).scalar_one()
        delivery = c.execute(select(deliveries)).one()
    engine.dispose()
    assert study.status == "done" and study.instance_count == n_instances == len(phantom_study.files)
    assert run.status == "done" and run.sr_sop_instance_uid == sr.SOPInstanceUID
    for stamp in ("last_image_at", "queued_at", "started_at", "loaded_at", "inferred_at", "sr_created_at",
                  "delivered_at", "finished_at"):
        assert getattr(run, stamp) is not None, stamp
    assert run.last_image_at <= run.queued_at <= run.started_at <= run.finished_at
    assert n_predictions == 52
    assert delivery.status == "delivered" and delivery.destination == "orthanc"
