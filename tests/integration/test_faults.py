"""Faults with real processes: a worker killed mid-study, Redis restarted, PostgreSQL stopped for a minute.

Each test runs the service as in production (`triage serve`, `triage worker` processes) and checks what a
hospital relies on: every study is processed exactly once, with one SR, whatever was killed.
"""
from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
from sqlalchemy import create_engine, func, select

from sql.database import upgrade
from sql.schema import instances
from tests.support.private_services import PrivatePostgres, PrivateRedis
from tests.support.processes import wait_for
from tests.support.service import Service

pytestmark = [pytest.mark.slow, pytest.mark.needs_dcmtk]


@pytest.fixture(autouse=True)
def _needs_dcmtk():
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk is not installed (run ops/setup.sh)")


def _phantoms(folder, seeds, lesion="tumour"):
    from train.phantoms import write_phantom_study

    return [write_phantom_study(folder, lesion=lesion, seed=seed, series=["AX T2 FLAIR"]) for seed in seeds]


def _sr_files(service: Service) -> list:
    return sorted((service.workdir / "var" / "outbox").rglob("*.dcm"))


def test_worker_killed_mid_study_completes_once_on_another_worker(tmp_path, postgres_url, redis_url, tiny_bundle):
    [study] = _phantoms(tmp_path / "studies", [21])
    service = Service(tmp_path, postgres_url, redis_url, tiny_bundle,
                      worker={"task_time_limit_s": 5, "redispatch_after_s": 5},
                      broker={"visibility_timeout_s": 10})
    try:
        service.start_serve()
        workers = {name: service.start_worker(name) for name in ("worker_a", "worker_b")}
        assert service.send(study.folder).returncode == 0

        def running():
            runs = service.runs()
            return runs[0] if runs and runs[0].status == "running" else None

        run = wait_for(running, 120, interval=0.05, what="a worker to start the run")
        victim_pid = int(run.worker_host.rsplit(":", 1)[1])
        victim = next(name for name, p in workers.items() if p.pid == victim_pid)
        os.kill(victim_pid, signal.SIGKILL)  # mid-study: the model is loading or running

        def finished():
            runs = service.runs()
            return runs[0] if runs and runs[0].status in ("done", "failed") else None

        run = wait_for(finished, 180, interval=0.5, what="the run to finish on the other worker")
    finally:
        service.stop()
    assert run.status == "done", service.log("worker_a") + service.log("worker_b")
    assert run.attempts == 2 and int(run.worker_host.rsplit(":", 1)[1]) != victim_pid, victim
    assert len(service.runs()) == 1
    assert len(_sr_files(service)) == 1


def test_redis_restarted_mid_run_loses_nothing(tmp_path, postgres_url, tiny_bundle):
    studies = _phantoms(tmp_path / "studies", [31, 32, 33, 34])
    redis = PrivateRedis(tmp_path).start()
    service = Service(tmp_path, postgres_url, redis.url, tiny_bundle,
                      worker={"redispatch_after_s": 5, "task_time_limit_s": 60})
    try:
        service.start_serve()
        service.start_worker("worker")
        for study in studies[:2]:
            assert service.send(study.folder).returncode == 0
        wait_for(lambda: len(service.runs()) >= 2, 60, what="two studies queued")
        redis.kill()  # queued messages are gone: this Redis keeps nothing on disk
        for study in studies[2:]:  # the SCP keeps receiving while the broker is down
            assert service.send(study.folder).returncode == 0
        time.sleep(3)
        redis.start()

        def all_done():
            runs = service.runs()
            return len(runs) == 4 and all(r.status == "done" for r in runs)

        wait_for(all_done, 240, interval=1, what="all four studies processed after the restart")
    finally:
        service.stop()
        redis.kill()
    runs = service.runs()
    assert sorted(r.study_version for r in runs) == [1, 1, 1, 1]
    assert len({r.study_id for r in runs}) == 4
    assert len(_sr_files(service)) == 4


def test_postgres_stopped_for_a_minute_scp_keeps_receiving_and_backlog_is_processed(tmp_path, tiny_bundle,
                                                                                    redis_url):
    studies = _phantoms(tmp_path / "studies", [41, 42])
    postgres = PrivatePostgres().init()
    upgrade(postgres.url)
    service = Service(tmp_path, postgres.url, redis_url, tiny_bundle, worker={"redispatch_after_s": 10})
    try:
        service.start_serve()
        service.start_worker("worker")
        assert service.send(studies[0].folder).returncode == 0
        wait_for(lambda: any(r.status == "done" for r in service.runs()), 120, what="the first study processed")

        postgres.stop()
        started = time.monotonic()
        sent = service.send(studies[1].folder)
        assert sent.returncode == 0, sent.stderr  # accepted while the database is down
        time.sleep(max(0.0, 60 - (time.monotonic() - started)))
        assert service.processes["serve"].poll() is None
        postgres.start()

        def both_done():
            runs = service.runs()
            return len(runs) == 2 and all(r.status == "done" for r in runs)

        wait_for(both_done, 180, interval=1, what="the backlog processed after PostgreSQL came back")
        engine = create_engine(postgres.url)
        with engine.connect() as c:
            stored = c.execute(select(func.count()).select_from(instances)).scalar_one()
        engine.dispose()
    finally:
        service.stop()
        postgres.remove()
    assert stored == sum(len(s.files) for s in studies)
    assert len(_sr_files(service)) == 2
