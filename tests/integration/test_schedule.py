"""The one Celery beat schedule of a deployment: every periodic job is in it, and each entry's task really runs
on the worker that consumes its queue (real Redis, PostgreSQL, `triage train worker` and `triage worker`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import select

from sql.database import make_engine, upgrade
from sql.fairness_schema import fairness_refreshes
from sql.registry_schema import training_runs
from sql.schema import instances
from tests.support.dicom_factory import mr_slice
from tests.support.processes import start_process, wait_for
from tests.support.service import Service
from worker.celery_app import FAIRNESS_REFRESH, TRAIN_NIGHTLY, beat_schedule, make_celery
from worker.commands.jobs import FAIRNESS_REFRESH_TASK, NIGHTLY_TASK, TRAINING_QUEUE
from worker.config import load_settings

EVERY_JOB = {
    "nightly-retraining": ("triage.train_nightly", "training"),
    "fairness-refresh": ("triage.fairness_refresh", "training"),
    "index-maintenance": ("triage.index_maintenance", "maintenance"),
    "store-reconciliation": ("triage.reconcile_store", "maintenance"),
}


def test_the_beat_schedule_holds_every_periodic_job(tmp_path):
    settings = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path)})
    # `celery -A worker.tasks beat` runs the app make_celery builds: the schedule is on it.
    schedule = make_celery(settings).conf.beat_schedule
    assert {name: (entry["task"], entry["options"]["queue"]) for name, entry in schedule.items()} == EVERY_JOB
    # worker never imports train: the training worker's task names and queue are spelled in both, and agree.
    assert (NIGHTLY_TASK, FAIRNESS_REFRESH_TASK, TRAINING_QUEUE) == (TRAIN_NIGHTLY, FAIRNESS_REFRESH, "training")
    assert schedule["fairness-refresh"]["schedule"].total_seconds() == 3600
    assert schedule["nightly-retraining"]["schedule"].hour == {1}


def test_a_job_can_be_turned_off_and_a_bad_crontab_names_its_key(tmp_path):
    settings = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path), "TRIAGE_FAIRNESS__REFRESH_INTERVAL_S": "0",
                                      "TRIAGE_MAINTENANCE__RECONCILE_CRON": ""})
    assert set(beat_schedule(settings)) == {"nightly-retraining", "index-maintenance"}
    bad = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path), "TRIAGE_MAINTENANCE__INDEX_CRON": "every night"})
    with pytest.raises(ValueError, match="maintenance.index_cron"):
        beat_schedule(bad)


def _orphan_in_store(incoming: Path) -> str:
    """A file in the store whose row never reached the database (a crash between Success and the row)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    ds = mr_slice(study_uid, series_uid, 0)
    path = incoming / study_uid / series_uid / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)
    old = time.time() - 3600  # older than store.reconcile_grace_s: not a file the bookkeeper is still writing
    os.utime(path, (old, old))
    return str(ds.SOPInstanceUID)


@pytest.mark.slow
def test_each_beat_entry_runs_its_task_once_on_the_worker_of_its_queue(tmp_path, postgres_url, redis_url,
                                                                       tiny_bundle):
    from train.fairness.cohort import write_cohort_db
    from train.fairness.make_cohort import DEFAULT_OUT

    service = Service(tmp_path, postgres_url, redis_url, tiny_bundle,
                      slice_evidence={"enabled": True, "config": "tiny", "device": "cpu"},
                      fairness={"bootstrap": {"sample_size": 50, "iterations": 2, "seed": 1}})
    settings = load_settings(service.config_path, environ={})
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    write_cohort_db(engine, DEFAULT_OUT)  # studies and reports for the fairness refresh to analyse
    orphan_sop = _orphan_in_store(settings.incoming_dir)
    index_file = settings.var_dir / "index" / "slices.faiss"

    schedule = make_celery(settings).conf.beat_schedule
    done = {
        "nightly-retraining": lambda c: c.execute(select(training_runs.c.status)).scalars().all()
        not in ([], ["running"]),
        "fairness-refresh": lambda c: c.execute(select(fairness_refreshes.c.status)).scalars().all() == ["done"],
        # (the nightly run rebuilds the index too: the maintenance task's own line in its worker's log tells)
        "index-maintenance": lambda c: index_file.exists() and "index maintenance: " in service.log("cpu"),
        "store-reconciliation": lambda c: c.execute(select(instances.c.id).where(
            instances.c.sop_instance_uid == orphan_sop)).first() is not None,
    }
    assert set(done) == set(schedule)
    try:
        service._start("training", ["train", "worker", "--loglevel", "INFO"])
        service._start("cpu", ["worker", "--queues", "maintenance", "--hostname", "cpu@localhost"])
        app = make_celery(settings)
        for name, entry in schedule.items():  # what beat does when an entry is due
            app.send_task(entry["task"], args=entry.get("args", ()), kwargs=entry.get("kwargs", {}),
                          **entry["options"])
        for name, finished in done.items():
            def check(finished=finished):
                with engine.connect() as c:
                    return finished(c)
            wait_for(check, 240, what=f"the {name} task to run")
    except TimeoutError:
        raise AssertionError(service.log("training") + "\n----\n" + service.log("cpu"))
    finally:
        service.stop()
    with engine.connect() as c:
        [status] = c.execute(select(training_runs.c.status)).scalars().all()
    assert status in ("done", "skipped")  # too few labelled studies to retrain: recorded, not failed
    assert (settings.var_dir / "fairness" / "report.html").exists()


@pytest.mark.slow
def test_the_deployments_beat_command_sends_the_jobs_when_due(tmp_path, redis_url):
    """`celery -A worker.tasks beat`, as systemd, compose and Helm run it, with a refresh due every second."""
    from worker.queue_watch import redis_depths

    config = tmp_path / "triage.yaml"
    config.write_text(yaml.safe_dump({"var_dir": str(tmp_path / "var"), "broker": {"url": redis_url},
                                      "fairness": {"refresh_interval_s": 1}}))
    celery = Path(sys.executable).parent / "celery"
    log = (tmp_path / "beat.log").open("wb")
    beat = start_process([str(celery), "-A", "worker.tasks", "beat", "--loglevel", "INFO",
                             "--schedule", str(tmp_path / "celerybeat-schedule")],
                         cwd=tmp_path, env={**os.environ, "TRIAGE_CONFIG": str(config)}, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: redis_depths(redis_url, ["training"])["training"] >= 2, 120,
                 what="beat to send the fairness refresh twice")
    except TimeoutError:
        raise AssertionError((tmp_path / "beat.log").read_text()[-3000:])
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(30)
    assert "triage.fairness_refresh" in (tmp_path / "beat.log").read_text()
