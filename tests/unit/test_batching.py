"""Micro-batching in the worker: ready studies run through the model together, urgent first, none starving,
and a broken study fails alone."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from pacs_bridge.assembly import CompletionPolicy, StudyAssembler
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from sql.schema import processing_runs, studies, utcnow
from tests.support.studies import _receive
from worker.config import load_settings
from worker.pipelines.neuro_mri import NeuroMriPipeline
from worker.run_book import RunBook


@pytest.fixture(scope="module")
def phantom_folders(tmp_path_factory):
    from train.phantoms import write_phantom_study

    root = tmp_path_factory.mktemp("phantoms")
    return [write_phantom_study(root, lesion=lesion, seed=60 + i, series=["AX T2 FLAIR"]).folder
            for i, lesion in enumerate(("tumour", "normal", "infarct", "hydrocephalus"))]


@pytest.fixture
def queued(tmp_path, phantom_folders, tiny_bundle):
    """Four complete studies with queued runs (ids in arrival order), and a processor with batches of 3 that
    takes one batch per task (no prefetch)."""
    settings = load_settings(environ={
        "TRIAGE_VAR_DIR": str(tmp_path / "var"), "TRIAGE_MODEL__BUNDLE": str(tiny_bundle),
        "TRIAGE_MODEL__DEVICE": "cpu", "TRIAGE_EXPLAIN__ENABLED": "false", "TRIAGE_WORKER__BATCH_SIZE": "3",
        "TRIAGE_WORKER__BATCH_WAIT_S": "0", "TRIAGE_WORKER__PREFETCH_BATCHES": "1",
    })
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    store = InstanceStore(settings.incoming_dir, settings.quarantine_dir)
    for folder in phantom_folders:
        _receive(engine, store, folder)
    StudyAssembler(engine, lambda *args, **kwargs: None, CompletionPolicy(0, 600)).check_once(
        utcnow() + timedelta(seconds=1))
    with engine.connect() as c:
        run_ids = c.execute(select(processing_runs.c.id).order_by(processing_runs.c.id)).scalars().all()
    assert len(run_ids) == 4
    processor = NeuroMriPipeline(RunBook(settings, engine, enqueue_delivery=lambda delivery_id: None))
    yield processor, engine, run_ids, settings
    engine.dispose()


def _runs(engine):
    with engine.connect() as c:
        return {r.id: r for r in c.execute(select(processing_runs)).all()}


def test_one_task_processes_a_batch_of_ready_studies_together(queued):
    processor, engine, run_ids, _ = queued
    assert processor.process(run_ids[0], worker_name="gpu0").status == "done"
    runs = _runs(engine)
    done = [r for r in runs.values() if r.status == "done"]
    assert len(done) == 3  # the task's own run and two companions
    assert all(r.timings["batch_studies"] == 3 for r in done)
    assert all(r.worker_host.startswith("gpu0:") for r in done)
    # A companion's own message, arriving later, finds its run done: nothing is processed twice.
    companion = next(r.id for r in done if r.id != run_ids[0])
    assert processor.process(companion).status == "duplicate"


def test_urgent_studies_join_the_batch_first_and_old_routine_ones_do_not_starve(queued):
    processor, engine, run_ids, _ = queued
    first, second, third, fourth = run_ids
    with engine.begin() as c:
        c.execute(update(processing_runs).values(lane="routine", queued_at=utcnow()))
        c.execute(update(processing_runs).where(processing_runs.c.id == fourth).values(lane="urgent"))
        # The second study has waited longer than worker.starvation_after_s (600 s by default).
        c.execute(update(processing_runs).where(processing_runs.c.id == second)
                  .values(queued_at=utcnow() - timedelta(seconds=3600)))
    processor.process(first)
    runs = _runs(engine)
    assert {i for i, r in runs.items() if r.status == "done"} == {first, second, fourth}
    assert runs[third].status == "queued"


def test_a_study_that_cannot_be_processed_fails_alone(queued):
    processor, engine, run_ids, settings = queued
    with engine.connect() as c:
        broken_study = c.execute(select(processing_runs.c.study_id).where(processing_runs.c.id == run_ids[1])
                                 ).scalar_one()
        uid = c.execute(select(studies.c.study_instance_uid).where(studies.c.id == broken_study)).scalar_one()
    for path in (settings.incoming_dir / uid).rglob("*.dcm"):
        path.write_bytes(b"not dicom any more")  # the files were damaged on disk after they were received
    processor.process(run_ids[0])
    runs = _runs(engine)
    assert runs[run_ids[1]].status == "failed" and runs[run_ids[1]].error
    assert runs[run_ids[0]].status == "done" and runs[run_ids[2]].status == "done"


def test_while_a_batch_is_in_the_model_the_next_ready_studies_are_loaded_and_run_in_the_same_task(queued):
    processor, engine, run_ids, settings = queued
    settings.worker.prefetch_batches = 2
    settings.worker.load_processes = 2
    from worker.study_loader import StudyLoader

    processor.loader = StudyLoader(2)  # loads in two processes of a pool
    try:
        assert processor.process(run_ids[0], worker_name="gpu0").status == "done"
    finally:
        processor.loader.close()
    runs = _runs(engine)
    assert all(r.status == "done" for r in runs.values())  # a batch of three, then the fourth study
    assert sorted(r.timings["batch_studies"] for r in runs.values()) == [1, 3, 3, 3]
    assert all(r.attempts == 1 for r in runs.values())
    assert processor.process(run_ids[3]).status == "duplicate"  # its own message finds it done
