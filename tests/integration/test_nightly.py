"""Nightly retraining on a real PostgreSQL database (issue 8, acceptance 2): new labelled studies give a
candidate that is evaluated, promoted when its gates pass and refused when they do not; a running worker serves
the promoted version from its next study on, and a rollback restores the previous one."""
from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import func, insert, select

from models.backbone import bundle_backbone_id
from models.bundle import load_bundle, random_bundle, save_bundle
from models.labels import DIAGNOSIS_NAMES
from pacs_bridge.assembly import CompletionPolicy, StudyAssembler
from pacs_bridge.bookkeeping import ReceivedInstance, write_batch
from pacs_bridge.intake import check_received
from pacs_bridge.storage import InstanceStore
from sql import model_registry
from sql.database import make_engine, upgrade
from sql.embedding_store import store_embedding
from sql.registry_schema import model_versions, study_embeddings, training_metrics, training_runs
from sql.report_schema import ground_truth_labels, reports, study_attributes
from sql.schema import processing_runs, utcnow
from train import registry
from train.nightly import StudyTruth, gate_candidate, head_data, run_nightly, split_studies
from train.triage_table import load_triage_table
from worker.celery_app import beat_schedule
from worker.commands.jobs import NIGHTLY_TASK, TRAINING_QUEUE, rebuild_vector_index, training_app
from worker.commands.train_settings import gate_config, nightly_config
from worker.config import load_settings
from worker.pipelines.neuro_mri import NeuroMriPipeline
from worker.run_book import RunBook

LABELS = ("trauma_subdural_hematoma", "vascular_ischemic_large_vessel_stroke", "ventricular_ventriculomegaly")


@pytest.fixture(scope="module")
def baseline_bundle(tmp_path_factory):
    """The configured model: random heads, so any sensibly trained candidate beats it."""
    bundle = random_bundle("tiny", seed=0, version="baseline-random-tiny")
    return save_bundle(tmp_path_factory.mktemp("baseline") / "bundle", bundle.vqvae, bundle.prima, bundle.manifest)


@pytest.fixture
def site(postgres_url, tmp_path, baseline_bundle):
    settings = load_settings(environ={
        "TRIAGE_VAR_DIR": str(tmp_path / "var"), "TRIAGE_DATABASE__URL": postgres_url,
        "TRIAGE_MODEL__BUNDLE": str(baseline_bundle), "TRIAGE_MODEL__DEVICE": "cpu",
        "TRIAGE_EXPLAIN__ENABLED": "false", "TRIAGE_WORKER__BATCH_SIZE": "1", "TRIAGE_WORKER__BATCH_WAIT_S": "0",
        # One run per call: the test serves each study with the model version of its moment.
        "TRIAGE_WORKER__PREFETCH_BATCHES": "1",
        "TRIAGE_TRAINING__HEADS_STEPS": "120", "TRIAGE_TRAINING__GATES__MIN_HELD_OUT": "8",
    })
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    yield settings, engine
    engine.dispose()


def _label_studies(engine, backbone: str, first: int, count: int, seed: int) -> list[str]:
    """``count`` reported studies with stored embeddings in which each finding shifts its own direction."""
    rng = np.random.default_rng(seed)
    now = utcnow()
    uids = []
    for i in range(first, first + count):
        uid = f"2.25.{900000 + i}"
        kind = i % 4  # 0-2: one of LABELS, 3: normal
        vector = rng.normal(size=128).astype(np.float32)
        if kind < 3:
            vector[kind * 10:(kind + 1) * 10] += 2.5
        store_embedding(engine, uid, backbone, vector, "baseline-random-tiny", "worker")
        with engine.begin() as c:
            report_id = c.execute(insert(reports).values(
                study_instance_uid=uid, status="F", reported_at=now, received_at=now, text="synthetic report",
                source="synthetic", source_message_id=uid)).inserted_primary_key[0]
            c.execute(insert(ground_truth_labels), [
                {"report_id": report_id, "label": label, "value": int(kind == k), "source": "synthetic",
                 "created_at": now} for k, label in enumerate(LABELS)])
            c.execute(insert(study_attributes).values(study_instance_uid=uid, sex="F" if i % 2 else "M",
                                                      updated_at=now))
        uids.append(uid)
    return uids


@pytest.fixture(scope="module")
def phantom_folders(tmp_path_factory):
    from train.phantoms import write_phantom_study

    root = tmp_path_factory.mktemp("phantoms")
    return [write_phantom_study(root, lesion=lesion, seed=80 + i, series=["AX T2 FLAIR"]).folder
            for i, lesion in enumerate(("subdural_haemorrhage", "normal", "infarct"))]


def _receive_all(settings, engine, folders) -> list[int]:
    store = InstanceStore(settings.incoming_dir, settings.quarantine_dir)
    for folder in folders:
        items = []
        for path in sorted(folder.rglob("*.dcm")):
            data = path.read_bytes()
            header = check_received(data)
            stored = store.store(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid,
                                 data)
            items.append(ReceivedInstance(header=header, stored=stored, calling_aet="MODALITY"))
        with engine.begin() as connection:
            write_batch(connection, items)
    StudyAssembler(engine, lambda *args, **kwargs: None, CompletionPolicy(0, 600)).check_once(
        utcnow() + timedelta(seconds=1))
    with engine.connect() as c:
        return c.execute(select(processing_runs.c.id).order_by(processing_runs.c.id)).scalars().all()


def _served_version(engine, run_id: int) -> str:
    with engine.connect() as c:
        return c.execute(select(processing_runs.c.model_version).where(processing_runs.c.id == run_id)).scalar_one()


def test_nightly_promotes_a_better_candidate_and_the_running_worker_serves_it_next(site, phantom_folders):
    settings, engine = site
    run_ids = _receive_all(settings, engine, phantom_folders)
    worker = NeuroMriPipeline(RunBook(settings, engine, enqueue_delivery=lambda delivery_id: None))
    assert worker.process(run_ids[0]).status == "done"
    assert _served_version(engine, run_ids[0]) == "baseline-random-tiny"

    backbone = bundle_backbone_id(load_bundle(settings.model.bundle))
    _label_studies(engine, backbone, 0, 96, seed=1)
    outcome = run_nightly(engine, nightly_config(settings),
                          after_run=lambda result: rebuild_vector_index(settings, result))

    assert outcome.status == "done" and outcome.decision == "promoted", outcome.reason
    assert (settings.var_dir / "index" / "slices.faiss").exists()  # the vector index was rebuilt
    assert outcome.base_version == "baseline-random-tiny"
    assert all(gate["passed"] for gate in outcome.gates.values())
    assert {"mean_auroc", "label_auroc", "calibration", "fairness", "flagged_disparities"} <= set(outcome.gates)
    candidate = outcome.metrics["candidate"]
    assert candidate["mean_auroc"] > 0.9 > outcome.metrics["serving"]["mean_auroc"]
    assert model_registry.serving_version(engine).version == outcome.candidate_version
    with engine.connect() as c:
        run = c.execute(select(training_runs).where(training_runs.c.id == outcome.run_id)).one()
        logged = c.execute(select(func.count()).select_from(training_metrics)
                           .where(training_metrics.c.run_id == outcome.run_id)).scalar_one()
    assert run.status == "done" and run.candidate_version == outcome.candidate_version and logged > 5

    # The same worker process, not restarted: the next study is served by the promoted version ...
    assert worker.process(run_ids[1]).status == "done"
    assert _served_version(engine, run_ids[1]) == outcome.candidate_version
    # ... and after a rollback by the one before it.
    assert registry.rollback(engine, actor="test", reason="rollback drill").version == "baseline-random-tiny"
    assert worker.process(run_ids[2]).status == "done"
    assert _served_version(engine, run_ids[2]) == "baseline-random-tiny"
    with engine.connect() as c:
        recorded = c.execute(select(func.count()).select_from(study_embeddings)
                             .where(study_embeddings.c.source == "worker",
                                    study_embeddings.c.study_instance_uid.not_like("2.25.9%"))).scalar_one()
    assert recorded == 3  # the worker stored each processed study's embedding for future retraining


def test_nightly_refuses_a_worse_candidate_and_the_serving_model_stays(site):
    settings, engine = site
    config = nightly_config(settings)
    backbone = bundle_backbone_id(load_bundle(settings.model.bundle))
    _label_studies(engine, backbone, 0, 96, seed=1)
    first = run_nightly(engine, config)
    assert first.decision == "promoted", first.reason

    nothing_new = run_nightly(engine, config)
    assert nothing_new.status == "skipped" and "0 studies with new ground truth" in nothing_new.reason

    _label_studies(engine, backbone, 96, 24, seed=2)

    def ruin(prima):  # a planted worse candidate: its diagnosis heads forget what they learnt
        prima.diagnosis_heads.reset_parameters()

    worse = run_nightly(engine, config, candidate_hook=ruin)
    assert worse.status == "done" and worse.decision == "rejected"
    assert not worse.gates["mean_auroc"]["passed"] and "mean_auroc" in worse.reason
    assert model_registry.serving_version(engine).version == first.candidate_version
    with engine.connect() as c:
        status = c.execute(select(model_versions.c.status)
                           .where(model_versions.c.version == worse.candidate_version)).scalar_one()
    assert status == model_registry.REJECTED


def test_an_interrupted_nightly_run_resumes_from_its_checkpoint(site):
    settings, engine = site
    config = nightly_config(settings)
    backbone = bundle_backbone_id(load_bundle(settings.model.bundle))
    _label_studies(engine, backbone, 0, 96, seed=1)

    stopped = run_nightly(engine, config, should_stop=lambda step: step == 60)
    assert stopped.status == "interrupted"
    resumed = run_nightly(engine, config)
    assert resumed.status == "done" and resumed.decision == "promoted"
    with engine.connect() as c:
        steps = c.execute(select(training_metrics.c.step).where(
            training_metrics.c.run_id == resumed.run_id, training_metrics.c.stage == "heads")).scalars().all()
    assert min(steps) > 60  # the resumed run did not start again from step 0


def test_nightly_computes_missing_embeddings_from_the_stored_images(site, phantom_folders):
    settings, engine = site
    _receive_all(settings, engine, phantom_folders)
    now = utcnow()
    with engine.begin() as c:
        for folder in phantom_folders:
            report_id = c.execute(insert(reports).values(
                study_instance_uid=folder.name, status="F", reported_at=now, received_at=now, text="report",
                source="synthetic", source_message_id=folder.name)).inserted_primary_key[0]
            c.execute(insert(ground_truth_labels).values(report_id=report_id, label=LABELS[0], value=1,
                                                         source="synthetic", created_at=now))
    run_nightly(engine, nightly_config(settings))
    with engine.connect() as c:
        computed = c.execute(select(study_embeddings.c.study_instance_uid)
                             .where(study_embeddings.c.source == "nightly")).scalars().all()
    assert sorted(computed) == sorted(folder.name for folder in phantom_folders)


def test_beat_sends_the_nightly_job_to_the_training_queue_on_its_schedule(tmp_path):
    settings = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path),
                                      "TRIAGE_TRAINING__NIGHTLY_CRON": "15 2 * * *"})
    entry = beat_schedule(settings)["nightly-retraining"]
    assert entry["task"] == NIGHTLY_TASK and entry["options"]["queue"] == TRAINING_QUEUE
    assert entry["schedule"].hour == {2} and entry["schedule"].minute == {15}
    app = training_app(settings)
    assert NIGHTLY_TASK in app.tasks


def test_a_candidate_less_fair_than_the_serving_model_fails_the_fairness_gates():
    serving = {"n": 40, "mean_auroc": 0.90, "auroc_by_label": {"x": 0.90}, "priority_auroc": 0.9,
               "calibration_error": 0.05, "worst_disparity": 0.05, "flagged_disparities": 0}
    candidate = {**serving, "mean_auroc": 0.93, "auroc_by_label": {"x": 0.93}, "worst_disparity": 0.25,
                 "flagged_disparities": 1}
    gates = gate_candidate(candidate, serving, gate_config(load_settings(environ={}).training.gates))
    assert gates["mean_auroc"]["passed"]  # better on average ...
    assert not gates["fairness"]["passed"] and not gates["flagged_disparities"]["passed"]  # ... but less fair


def test_the_held_out_studies_stay_the_same_whatever_the_training_seed(tmp_path):
    settings = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path)})
    uids = [f"1.2.826.0.1.{i}" for i in range(400)]
    first = split_studies(uids, replace(nightly_config(settings), seed=1))
    second = split_studies(uids, replace(nightly_config(settings), seed=2))
    assert first.held_out == second.held_out and first.held_out
    assert sorted(first.train + first.validation + first.held_out) == sorted(uids)


def test_head_data_leaves_uncertain_and_unjudged_diagnoses_unknown():
    now = utcnow()
    names = DIAGNOSIS_NAMES
    truth = {"report": StudyTruth({names[0]: 1, names[1]: -1}, now),
             "feedback": StudyTruth({names[2]: 0}, now, partial=True)}
    embeddings = {uid: np.ones(8, dtype=np.float32) for uid in truth}
    data = head_data(["report", "feedback"], truth, embeddings, names, load_triage_table(None, names))
    assert data.diagnosis[0, 0] == 1 and np.isnan(data.diagnosis[0, 1]) and data.diagnosis[0, 2] == 0
    assert data.diagnosis[1, 2] == 0 and np.isnan(data.diagnosis[1, 0])  # feedback judged only names[2]
    assert tuple(data.embeddings.shape) == (2, 8)
