"""Delivering results to a real Orthanc by C-STORE and STOW-RS; retries, dead letters and `triage deliveries retry`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import insert, select

from pacs_bridge.schema import deliveries, events, make_engine, processing_runs, studies, utcnow
from tests.conftest import Orthanc
from tests.dicom_factory import mr_slice
from worker.config import load_settings
from worker.database import upgrade
from worker.delivery import DeliveryBook

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, params=["idle", pytest.param("every core busy", marks=pytest.mark.slow)])
def load(request):
    """Every delivery test runs twice: on an idle machine and while other processes keep every core busy."""
    if request.param != "idle":
        request.getfixturevalue("cpu_stress")
    return request.param


def _setup(tmp_path: Path, destinations: list[dict], attempts: int = 3):
    config = {"var_dir": str(tmp_path / "var"), "destinations": destinations,
              "delivery": {"attempts": attempts, "backoff_s": 0.01}}
    config_path = tmp_path / "triage.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings = load_settings(config_path, environ={})
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    study_uid = generate_uid()
    with engine.begin() as c:
        study_id = c.execute(insert(studies).values(
            study_instance_uid=study_uid, status="done", version=1, instance_count=1,
            first_received_at=utcnow(), last_received_at=utcnow())).inserted_primary_key[0]
        run_id = c.execute(insert(processing_runs).values(
            study_id=study_id, study_version=1, pipeline="neuro_mri", status="done", attempts=1,
        )).inserted_primary_key[0]
    result = tmp_path / "result.dcm"
    ds = mr_slice(study_uid, generate_uid(), 0)
    ds.save_as(result, enforce_file_format=True)
    return config_path, settings, engine, run_id, result, str(ds.SOPInstanceUID)


def _orthanc_has(orthanc: Orthanc, sop_uid: str) -> bool:
    return bool(orthanc.find_instances(SOPInstanceUID=sop_uid))


@pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
def test_result_is_delivered_to_orthanc(kind, tmp_path, orthanc):
    destination = ({"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                    "ae_title": orthanc.aet} if kind == "dicom" else
                   {"name": "pacs", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web"})
    _, settings, engine, run_id, result, sop_uid = _setup(tmp_path, [destination])
    book = DeliveryBook(settings, engine)
    [delivery_id] = book.create(run_id, sop_uid, result)
    assert book.attempt(delivery_id).delivered
    assert _orthanc_has(orthanc, sop_uid)
    with engine.connect() as c:
        row = c.execute(select(deliveries)).one()
        run = c.execute(select(processing_runs)).one()
    assert (row.status, row.attempts) == ("delivered", 1)
    assert run.delivered_at is not None  # the run's turnaround ends when its last delivery is acknowledged
    assert book.attempt(delivery_id).delivered  # a redelivered task does not send again
    with engine.connect() as c:
        assert c.execute(select(deliveries.c.attempts)).scalar_one() == 1


def test_destination_down_is_retried_then_dead_lettered_then_retried_by_the_operator(tmp_path_factory, tmp_path):
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc-later"))  # ports chosen, not started: the PACS is down
    config_path, settings, engine, run_id, result, sop_uid = _setup(
        tmp_path, [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                    "ae_title": orthanc.aet}], attempts=3)
    os.environ["TRIAGE_CONFIG"] = str(config_path)
    try:
        from worker import tasks

        tasks.app.conf.triage_settings = settings
        tasks.delivery_book.cache_clear()
        tasks.app.conf.task_always_eager = True
        book = DeliveryBook(settings, engine)
        [delivery_id] = book.create(run_id, sop_uid, result)
        outcome = tasks.deliver.apply(args=[delivery_id]).get()  # eager: Celery runs the retries in place
    finally:
        tasks.app.conf.task_always_eager = False
        tasks.delivery_book.cache_clear()
        os.environ.pop("TRIAGE_CONFIG", None)
    assert outcome == "dead"
    with engine.connect() as c:
        row = c.execute(select(deliveries)).one()
        dead = c.execute(select(events).where(events.c.kind == "dead_letter")).all()
    assert (row.status, row.attempts) == ("failed", 3) and "not established" in row.last_error
    assert len(dead) == 1 and result.exists()  # nothing lost: the result is still there to send

    listing = subprocess.run([sys.executable, "-m", "worker.cli", "--config", str(config_path), "deliveries"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert listing.returncode == 0 and "dead" in listing.stdout, listing.stdout + listing.stderr

    orthanc.start()  # the PACS is back
    try:
        retry = subprocess.run([sys.executable, "-m", "worker.cli", "--config", str(config_path), "deliveries",
                                "retry"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        assert f"delivery {delivery_id}: delivered" in retry.stdout
        assert _orthanc_has(orthanc, sop_uid)
    finally:
        orthanc.stop()
    with engine.connect() as c:
        assert c.execute(select(deliveries.c.status)).scalar_one() == "delivered"
