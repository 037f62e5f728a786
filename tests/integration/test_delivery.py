"""Delivering results to a real Orthanc by C-STORE and STOW-RS; retries, dead letters and `triage deliveries retry`."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import insert, select

from sql.database import make_engine, upgrade
from sql.schema import deliveries, events, processing_runs, studies, utcnow
from tests.support.dicom_factory import mr_slice
from tests.support.orthanc import Orthanc
from tests.support.processes import REPO, free_port, wait_for
from tests.support.service import Service
from worker.celery_app import DELIVER, DELIVERY_QUEUE, PUBLISH, make_celery
from worker.config import load_settings
from worker.delivery import DeliveryBook
from worker.publishing import dead_letter_publications

pytestmark = pytest.mark.needs_orthanc


@pytest.fixture(autouse=True, params=["idle", pytest.param("every core busy", marks=pytest.mark.slow)])
def load(request):
    """Every delivery test runs twice: on an idle machine and while other processes keep every core busy."""
    if request.param != "idle":
        request.getfixturevalue("cpu_stress")
    return request.param


def _setup(tmp_path: Path, destinations: list[dict], attempts: int = 3, settings=None, engine=None,
           database_url: str = ""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "triage.yaml"
    if settings is None:
        config = {"var_dir": str(tmp_path / "var"), "destinations": destinations,
                  "database": {"url": database_url}, "delivery": {"attempts": attempts, "backoff_s": 0.01}}
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


def _row(engine, delivery_id: int):
    with engine.connect() as c:
        return c.execute(select(deliveries).where(deliveries.c.id == delivery_id)).one()


@pytest.mark.slow
def test_a_pacs_down_for_longer_than_the_old_policy_gets_its_sr_when_it_returns(tmp_path_factory, tmp_path,
                                                                               postgres_url, redis_url):
    """The old policy gave up after 3 attempts in about 6 s; a maintenance window now needs no manual step."""
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc-maintenance"))  # ports chosen, not started: PACS down
    destination = {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                   "ae_title": orthanc.aet}
    # Short backoffs so the test is quick; the defaults are 10 s doubling to 10 min, for 8 hours.
    service = Service(tmp_path, postgres_url, redis_url, tmp_path / "no-model-needed", destinations=[destination],
                      delivery={"backoff_s": 0.5, "max_backoff_s": 2, "retry_for_s": 600})
    settings = load_settings(service.config_path, environ={})
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    _, _, _, run_id, result, sop_uid = _setup(tmp_path / "run", [destination], settings=settings, engine=engine)
    [delivery_id] = DeliveryBook(settings, engine).create(run_id, sop_uid, result)
    try:
        service._start("worker", ["worker", "--queues", "delivery", "--hostname", "delivery@localhost"])
        make_celery(settings).send_task(DELIVER, args=[delivery_id], queue=DELIVERY_QUEUE)
        started = time.monotonic()
        wait_for(lambda: _row(engine, delivery_id).attempts >= 5 and time.monotonic() - started > 10, 120,
                 what="five failed attempts over more than 10 s")
        row = _row(engine, delivery_id)
        assert row.status == "pending" and "not established" in row.last_error  # still being retried, not dead
        orthanc.start()  # the maintenance window ends
        wait_for(lambda: _row(engine, delivery_id).status == "delivered", 60, what="the SR delivered")
        assert _orthanc_has(orthanc, sop_uid)
    finally:
        service.stop()
        orthanc.stop()
    with engine.connect() as c:
        assert c.execute(select(events).where(events.c.kind == "dead_letter")).all() == []
        assert c.execute(select(processing_runs.c.delivered_at)).scalar_one() is not None


class _Hook(BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        _Hook.received.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_a_worklist_raise_is_retried_on_the_delivery_queue_until_the_receiver_returns(tmp_path, postgres_url,
                                                                                      redis_url):
    hook_port = free_port()
    publisher = {"name": "pager", "kind": "webhook", "url": f"http://127.0.0.1:{hook_port}/hook",
                 "min_priority": "stat", "timeout_s": 1}
    service = Service(tmp_path, postgres_url, redis_url, tmp_path / "no-model-needed", publishers=[publisher],
                      delivery={"backoff_s": 0.5, "max_backoff_s": 2, "retry_for_s": 600})
    settings = load_settings(service.config_path, environ={})
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    _, _, _, run_id, _, _ = _setup(tmp_path / "run", [], settings=settings, engine=engine)
    with engine.begin() as c:
        c.execute(processing_runs.update().values(priority="stat"))

    def publications(action: str) -> list:
        with engine.connect() as c:
            return [r for r in c.execute(select(events.c.detail).where(events.c.kind == "publication")).scalars()
                    if r["action"] == action]

    server = None
    _Hook.received = []
    try:
        service._start("worker", ["worker", "--queues", "delivery", "--hostname", "delivery@localhost"])
        make_celery(settings).send_task(PUBLISH, args=[run_id], kwargs={"first_tried_at": time.time()},
                                        queue=DELIVERY_QUEUE)
        wait_for(lambda: len(publications("failed")) >= 4, 300, what="four failed publications")
        server = ThreadingHTTPServer(("127.0.0.1", hook_port), _Hook)  # the pager is back
        threading.Thread(target=server.serve_forever, daemon=True).start()
        wait_for(lambda: publications("notified"), 60, what="the retried publication")
    finally:
        service.stop()
        if server is not None:
            server.shutdown()
    assert len(_Hook.received) == 1 and b'"stat"' in _Hook.received[0]
    listing = subprocess.run([sys.executable, "-m", "worker.cli", "--config", str(service.config_path),
                              "publications"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert listing.returncode == 0 and "notified" in listing.stdout and "dead" not in listing.stdout


def test_a_publication_given_up_is_listed_as_a_dead_letter(tmp_path, postgres_url):
    _, settings, engine, run_id, _, _ = _setup(tmp_path, [], database_url=postgres_url)
    dead_letter_publications(engine, run_id, ["pager"], attempts=7)
    config_path = tmp_path / "triage.yaml"
    listing = subprocess.run([sys.executable, "-m", "worker.cli", "--config", str(config_path), "publications"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert listing.returncode == 0, listing.stderr
    [line] = [x for x in listing.stdout.splitlines() if " dead " in x]
    assert "pager" in line and str(run_id) in line
