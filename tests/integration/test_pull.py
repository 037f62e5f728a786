"""Pulling studies from a real Orthanc loaded with phantom studies: `triage pull` by C-MOVE (into our SCP), C-GET
and WADO-RS; `triage backfill` over a date range, killed part-way and resumed without fetching a study twice.

The commands run as processes, as an operator would run them; our SCP, bookkeeper and assembler (what `triage
serve` runs) run in the test process on the same database, so the pulled studies are routed like any other.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime

import pydicom
import pytest
from sqlalchemy import func, select

from pacs_bridge.pull import date_windows
from sql.pull_schema import pull_items, pull_jobs
from sql.schema import events, instances, processing_runs, series, studies
from tests.support.intake import phantom, receiver_for, storescu
from tests.support.orthanc import Orthanc
from tests.support.processes import REPO, free_port, start_process, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.needs_dcmtk, pytest.mark.needs_orthanc]

RULES = [{"name": "brain-mr", "pipeline": "neuro_mri",
          "match": {"all": [{"tag": "Modality", "equals": "MR"}, {"tag": "source", "present": True}]}}]
SEEDS = (31, 32, 33)


def _studies():
    return [phantom("normal", seed, ("AX T2 FLAIR",)) for seed in SEEDS]


def _date(study) -> str:
    return str(pydicom.dcmread(study.files[0], stop_before_pixels=True).StudyDate)


@pytest.fixture
def site(tmp_path, tmp_path_factory):
    """A PACS (Orthanc) holding three phantom studies and knowing our SCP; our receiver on the same database."""
    scp_port = free_port()
    pacs = Orthanc(tmp_path_factory.mktemp("pacs"), aet="PACS",
                   modalities={"triage": ("TRIAGE", "127.0.0.1", scp_port)}).start()
    for study in _studies():
        storescu(pacs.dicom_port, study.folder, aet="SCANNER", called="PACS")
    receiver = receiver_for(
        tmp_path, scp={"port": scp_port}, routing={"rules": RULES},
        pull={"sources": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port,
                           "ae_title": "PACS"},
                          {"name": "pacs-web", "kind": "dicomweb", "url": f"{pacs.url}/dicom-web"}],
              "query_window_days": 400, "pause_s": 0},
    ).start()
    yield receiver, pacs
    receiver.stop()
    pacs.stop()


def _triage(receiver, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "--config", str(receiver.config_path), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def _held(receiver) -> dict[str, int]:
    with receiver.engine.connect() as c:
        return dict(c.execute(select(studies.c.study_instance_uid, studies.c.instance_count)).all())


def _routed(receiver) -> dict[str, str]:
    receiver.complete()
    with receiver.engine.connect() as c:
        return {uid: detail["rule"] for uid, detail in c.execute(
            select(events.c.study_instance_uid, events.c.detail).where(events.c.kind == "routing")).all()}


def test_pull_retrieves_a_study_by_c_move_through_our_own_scp(site):
    receiver, pacs = site
    study = _studies()[0]
    result = _triage(receiver, "pull", "--study", study.study_instance_uid, "--via", "cmove")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pull job 1: done (1 done)" in result.stdout

    assert _held(receiver) == {study.study_instance_uid: len(study.files)}
    assert receiver.scp.received == len(study.files)  # it came in by C-STORE, the ordinary path
    with receiver.engine.connect() as c:
        assert c.execute(select(series.c.source, series.c.calling_aet)).one() == ("c-store", "PACS")
        item = c.execute(select(pull_items)).one()
        job = c.execute(select(pull_jobs)).one()
    assert (item.status, item.instances_received, item.attempts) == ("done", len(study.files), 1)
    assert (job.kind, job.via, job.source, job.status) == ("pull", "cmove", "pacs", "done")
    assert _routed(receiver) == {study.study_instance_uid: "brain-mr"}  # the same routing as any study


def test_a_c_move_that_our_scp_does_not_receive_fails_with_the_reason(site):
    receiver, pacs = site
    study = _studies()[0]
    receiver.scp.stop()  # `triage serve` is not running
    result = _triage(receiver, "pull", "--study", study.study_instance_uid, "--via", "cmove")
    assert result.returncode == 1
    assert "is `triage serve` listening as 'TRIAGE'" in result.stdout
    with receiver.engine.connect() as c:
        item = c.execute(select(pull_items)).one()
        job = c.execute(select(pull_jobs)).one()
    assert item.status == "failed" and "0 sent" in item.error and job.status == "failed"
    assert _held(receiver) == {}


@pytest.mark.parametrize("via, source", [("wado", "wado-rs"), ("cget", "c-get")])
def test_pull_retrieves_a_study_by_wado_rs_or_c_get_through_the_same_intake(site, via, source):
    receiver, pacs = site
    study = _studies()[1]
    result = _triage(receiver, "pull", "--study", study.study_instance_uid, "--via", via)
    assert result.returncode == 0, result.stdout + result.stderr

    assert _held(receiver) == {study.study_instance_uid: len(study.files)}
    assert receiver.scp.received == 0  # stored by the command, through the same checks and bookkeeping
    with receiver.engine.connect() as c:
        assert c.execute(select(series.c.source)).scalar_one() == source
        paths = c.execute(select(instances.c.path)).scalars().all()
    held = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in paths}
    for original in map(pydicom.dcmread, study.files):
        assert held[str(original.SOPInstanceUID)] == original  # the same dataset, element for element
    assert _routed(receiver) == {study.study_instance_uid: "brain-mr"}
    with receiver.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(processing_runs)).scalar_one() == 1


def test_backfill_retrieves_a_date_range_survives_a_kill_and_resumes_without_fetching_twice(site):
    receiver, pacs = site
    all_studies = _studies()
    dates = sorted(_date(s) for s in all_studies)
    first, last = (datetime.strptime(d, "%Y%m%d").date() for d in (dates[0], dates[-1]))
    backfill = [sys.executable, "-m", "worker.cli", "--config", str(receiver.config_path), "backfill",
                "--from", first.isoformat(), "--to", last.isoformat(), "--modality", "MR", "--via", "cmove"]

    # A slow backfill (30 s between studies), killed outright once its first study is in.
    process = start_process([*backfill, "--pause", "30"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _items("done", receiver) >= 1 or process.poll() is not None, 60,
                 what="the first study of the backfill")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    assert _items("done", receiver) == 1 and _items("pending", receiver) == 2
    first_done = set(_held(receiver))

    resumed = subprocess.run([*backfill, "--pause", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming pull job 1" in resumed.stdout and "pull job 1: done (3 done)" in resumed.stdout

    assert _held(receiver) == {s.study_instance_uid: len(s.files) for s in all_studies}
    # Nothing was fetched twice: the SCP received each instance exactly once, each study took one attempt.
    assert receiver.scp.received == sum(len(s.files) for s in all_studies)
    with receiver.engine.connect() as c:
        attempts = dict(c.execute(select(pull_items.c.study_instance_uid, pull_items.c.attempts)).all())
        versions = set(c.execute(select(studies.c.version)).scalars())
    assert attempts == {s.study_instance_uid: 1 for s in all_studies} and versions == {1}
    assert first_done < set(attempts)

    # A new job over the same range finds everything held already and retrieves nothing.
    again = subprocess.run([*backfill, "--new"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pull job 2: done (3 skipped)" in again.stdout
    assert receiver.scp.received == sum(len(s.files) for s in all_studies)
    assert set(_routed(receiver).values()) == {"brain-mr"} and len(_routed(receiver)) == 3


def test_backfill_by_qido_and_wado_rs_retrieves_every_study_of_the_range(site):
    receiver, pacs = site
    dates = sorted(_date(s) for s in _studies())
    last = datetime.strptime(dates[1], "%Y%m%d").date()  # the first two studies' dates only
    result = _triage(receiver, "backfill", "--from", "2000-01-01", "--to", last.isoformat(), "--via", "wado")
    assert result.returncode == 0, result.stdout + result.stderr
    held = _held(receiver)
    assert {s.study_instance_uid for s in _studies() if _date(s) <= dates[1]} == set(held)
    assert "pull job 1: done (2 done)" in result.stdout


def test_date_windows_cover_the_range_without_gaps():
    windows = date_windows(datetime(2024, 1, 1).date(), datetime(2024, 1, 20).date(), 7)
    assert [(a.day, b.day) for a, b in windows] == [(1, 7), (8, 14), (15, 20)]


def _items(status: str, receiver) -> int:
    with receiver.engine.connect() as c:
        return c.execute(select(func.count()).select_from(pull_items).where(pull_items.c.status == status)
                         ).scalar_one()
