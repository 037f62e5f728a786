"""Queue depth with every priority lane counted, and the warning for a routed queue that no worker consumes,
with real Redis, a real `triage serve` and a real Celery worker process."""
from __future__ import annotations

import shutil
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select

from sql.schema import events
from tests.support.dicom_factory import write_mr_series
from tests.support.processes import free_port, wait_for
from tests.support.service import Service
from worker.celery_app import dispatcher, make_celery
from worker.config import load_settings
from worker.service import queue_depths

pytestmark = pytest.mark.needs_dcmtk


def _depths(families) -> dict[str, float]:
    return {s.labels["queue"]: s.value for f in families if f.name == "triage_queue_depth" for s in f.samples}


def test_routine_and_urgent_lane_work_both_show_in_the_queue_depth(tmp_path, redis_url):
    config = tmp_path / "triage.yaml"
    config.write_text(yaml.safe_dump({"var_dir": str(tmp_path / "var"), "broker": {"url": redis_url}}))
    settings = load_settings(config, environ={})
    dispatch = dispatcher(make_celery(settings))
    for run_id in (1, 2, 3):
        dispatch(run_id, "neuro_mri", "routine")
    dispatch(4, "neuro_mri", "urgent")
    dispatch(5, "slice_knn", "routine")

    depths = _depths(queue_depths(settings))
    # The routine lane's messages sit in Redis priority sub-queues (kombu's "neuro_mri\x06\x166"): counted too.
    assert depths["neuro_mri"] == 4 and depths["slice_knn"] == 1
    assert depths["delivery"] == 0


def _scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, s.labels.get("queue", "")): s.value for f in text_string_to_metric_families(text)
            for s in f.samples}


@pytest.mark.slow
def test_a_study_routed_to_a_queue_no_worker_consumes_raises_the_warning(tmp_path, postgres_url, redis_url):
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk is not installed (run ops/setup.sh)")
    metrics_port = free_port()
    service = Service(
        tmp_path, postgres_url, redis_url, tmp_path / "no-model-needed",
        metrics={"serve_port": metrics_port},
        broker={"consumer_check_interval_s": 1},
        routing={"rules": [{"name": "mr-to-knn", "match": {"tag": "Modality", "equals": "MR"},
                            "pipeline": "slice_knn", "lane": "routine"},
                           {"name": "ct-to-neuro", "match": {"tag": "Modality", "equals": "CT"},
                            "pipeline": "neuro_mri", "lane": "urgent"}]},
    )
    study = tmp_path / "study"
    write_mr_series(study, n=3)
    try:
        service.start_serve()
        # A real worker, consuming neuro_mri only: the slice_knn queue the MR study is routed to has none.
        service._start("worker", ["worker", "--queues", "neuro_mri", "--hostname", "neuro@localhost"])
        wait_for(lambda: _scrape(metrics_port).get(("triage_queue_consumers", "neuro_mri")) == 1, 120,
                 what="the consumer check to see the neuro_mri worker")
        assert service.send(study).returncode == 0

        def warned():
            engine = create_engine(postgres_url)
            try:
                with engine.connect() as c:
                    return c.execute(select(events).where(events.c.kind == "queue_without_consumer")).all()
            finally:
                engine.dispose()

        [event] = wait_for(warned, 90, what="the queue_without_consumer event")
        metrics = _scrape(metrics_port)
    finally:
        service.stop()
    assert event.detail["queue"] == "slice_knn" and event.detail["waiting"] == 1
    assert "mr-to-knn" in event.reason and "--queues slice_knn" in event.reason
    assert metrics[("triage_queue_without_consumer", "slice_knn")] == 1
    assert metrics[("triage_queue_without_consumer", "neuro_mri")] == 0
    # The beat's nightly retraining and fairness refresh would never run: no training worker either.
    assert metrics[("triage_queue_without_consumer", "training")] == 1
    # The routine-lane study waits in a priority sub-queue and still shows in the depth.
    assert metrics[("triage_queue_depth", "slice_knn")] == 1
