"""What the service logs: one INFO line per study at completion, routing, dispatch, SR and delivery, with UIDs and
timings and never patient names or IDs; no line per image (pynetdicom's narrative is DEBUG, shown with -v); no
faiss import noise, one line naming its backend."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from sql.database import make_engine, upgrade
from tests.support.dicom_factory import mr_slice
from tests.support.intake import storescu
from tests.support.processes import REPO, free_port, start_process, wait_for

pytestmark = pytest.mark.needs_dcmtk

PATIENT_NAME, PATIENT_ID = "LOGTEST^SECRET", "PID-LOGTEST-4242"


def _study(folder: Path, images: int = 6) -> tuple[str, list[Path]]:
    study_uid, series_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(images):
        ds = mr_slice(study_uid, series_uid, index)
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.save_as(folder / f"{index}.dcm", enforce_file_format=True)
        paths.append(folder / f"{index}.dcm")
    return study_uid, paths


def _lines(text: str, study_uid: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if study_uid in line and word in line]


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_serve_logs_one_line_per_study_step_and_none_per_image(database, tmp_path, request):
    url = request.getfixturevalue("postgres_url") if database == "postgres" else ""
    scp_port = free_port()
    config = {"var_dir": str(tmp_path / "var"), "database": {"url": url},
              "scp": {"port": scp_port}, "metrics": {"serve_port": 0},
              "assembly": {"quiet_period_s": 1.0, "poll_interval_s": 0.2}}
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(config))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")},
           "TRIAGE_CONFIG": str(tmp_path / "triage.yaml"), "PYTHONPATH": str(REPO)}
    log_path = tmp_path / "serve.log"
    serve = start_process([sys.executable, "-m", "worker.cli", "serve"], cwd=tmp_path, env=env,
                          start_new_session=True, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: serve.poll() is None and "listening on" in log_path.read_text(), 60,
                 what="the receiver to listen")
        study_uid, paths = _study(tmp_path / "study")
        storescu(scp_port, *paths)
        wait_for(lambda: _lines(log_path.read_text(), study_uid, "dispatched"), 60, what="the dispatch line")
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(30)
    text = log_path.read_text()
    [complete] = _lines(text, study_uid, "complete:")
    [routed] = _lines(text, study_uid, "routed by rule")
    [dispatched] = _lines(text, study_uid, "dispatched to queue")
    assert " INFO " in complete and "6 instances over" in complete
    assert "'mr-to-neuro' to neuro_mri (routine lane)" in routed
    assert re.search(r"dispatched to queue neuro_mri \(routine lane\), [\d.]+s after the last image", dispatched)
    assert "Store Request" not in text and "pynetdicom" not in text  # nothing per image at INFO
    assert PATIENT_NAME.split("^")[0] not in text and PATIENT_ID not in text
    assert "ModuleNotFoundError" not in text


@pytest.fixture
def tiny_bundle(tmp_path_factory) -> Path:
    from models.bundle import random_bundle, save_bundle

    folder = tmp_path_factory.mktemp("bundle")
    bundle = random_bundle("tiny", seed=0)
    save_bundle(folder, bundle.vqvae, bundle.prima, bundle.manifest)
    return folder


@pytest.mark.slow
def test_a_processed_study_logs_its_sr_and_its_delivery(tmp_path, postgres_url, tiny_bundle, orthanc, caplog):
    from tests.support.studies import ingest
    from train.phantoms import write_phantom_study
    from worker.config import load_settings
    from worker.delivery import DeliveryBook
    from worker.pipelines.neuro_mri import NeuroMriPipeline
    from worker.run_book import RunBook

    config = {"var_dir": str(tmp_path / "var"), "database": {"url": postgres_url},
              "model": {"bundle": str(tiny_bundle), "device": "cpu"}, "explain": {"enabled": False},
              "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                                "ae_title": orthanc.aet}]}
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(config))
    settings = load_settings(tmp_path / "triage.yaml", environ={})
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    study = write_phantom_study(tmp_path / "phantom", lesion="tumour", seed=3)
    queued: list[int] = []
    try:
        with caplog.at_level(logging.INFO):
            run_id = ingest(engine, study.files)
            outcome = NeuroMriPipeline(RunBook(settings, engine, enqueue_delivery=queued.append)).process(run_id)
            assert outcome.status == "done", outcome
            book = DeliveryBook(settings, engine)
            assert all(book.attempt(delivery_id).delivered for delivery_id in queued)
    finally:
        engine.dispose()
    uid = study.study_instance_uid
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    for step in ("complete:", "routed by rule", "dispatched to queue", "SR "):
        assert len([m for m in messages if uid in m and step in m]) == 1, (step, messages)
    [written] = [m for m in messages if uid in m and "SR " in m]
    sop_uid = re.search(r"SR ([\d.]+) written to \S+ in [\d.]+s", written)[1]
    [delivered] = [m for m in messages if uid in m and "delivered to pacs" in m]
    assert re.search(rf"sr {re.escape(sop_uid)} delivered to pacs on attempt 1 in [\d.]+s", delivered), delivered
    patient = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    text = "\n".join(messages)
    assert str(patient.PatientName) not in text and str(patient.PatientID) not in text


def test_faiss_is_imported_without_noise_and_its_backend_named_once():
    code = ("from worker.cli import configure_logging; configure_logging(); import models.vector_index")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "ModuleNotFoundError" not in result.stderr and "faiss.loader" not in result.stderr
    assert len(re.findall(r"INFO models.vector_index: vector index backend: faiss \d", result.stderr)) == 1


def test_pynetdicom_narrates_only_when_verbose():
    from worker.cli import configure_logging

    pynetdicom = logging.getLogger("pynetdicom")
    before = pynetdicom.level
    try:
        configure_logging(verbose=False)
        assert not logging.getLogger("pynetdicom.dimse").isEnabledFor(logging.INFO)
        configure_logging(verbose=True)
        assert logging.getLogger("pynetdicom.dimse").isEnabledFor(logging.DEBUG)
    finally:
        pynetdicom.setLevel(before)
