"""Slice evidence in the worker: the slice_knn pipeline end to end (received CT studies -> kNN findings, similar
prior studies with their confirmed findings, an SR that carries them), the neuro_mri hook, the index table and
`triage index rebuild|delete|stats`. The tiny MedImageInsight configuration with seeded random weights."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pydicom
from sqlalchemy import select, update

from pacs_bridge.results import TriageResult
from pacs_bridge.sr import read_sr
from sql.schema import predictions, processing_runs
from sql.slice_index_schema import slice_embeddings
from tests.support.slice_evidence import CODED, NODULE_LABELS, world  # noqa: F401 (the fixture)
from worker.config import load_settings


def test_slice_knn_runs_give_knn_findings_and_similar_studies_in_the_sr(world):
    outcomes = [world.processor.process(world.run_of[uid], worker_name="cpu0") for uid in world.uids]
    assert [o.status for o in outcomes] == ["done"] * 5

    first = outcomes[0].result
    assert first.similar_studies == () and first.findings == ()  # nothing indexed before it

    last = outcomes[4].result  # a nodule study: its nearest reported neighbours are the nodule studies
    assert last.model_name == "medimageinsight-knn"
    assert [s.study_instance_uid for s in last.similar_studies] == [world.uids[2], world.uids[0]]
    assert all(s.findings == ("nodule", CODED) for s in last.similar_studies)
    assert last.similar_studies[0].similarity >= last.similar_studies[1].similarity
    assert [f.label for f in last.findings] == [CODED]  # "nodule" has no code: scored, not reported
    assert last.findings[0].positive and last.priority == "urgent"

    normal = outcomes[3].result  # a normal study: its nearest neighbour (k = 1 here) has no finding
    assert not any(f.positive for f in normal.findings) and normal.priority == "routine"

    # the SR written for the run carries the same similar studies, exactly
    # (named by pseudonymous reference, never by the other patients' study UIDs; coded findings only)
    decoded = read_sr(pydicom.dcmread(outcomes[4].sr_path))
    assert [(s.study_instance_uid, s.reference, s.similarity, s.findings) for s in decoded.similar_studies] == [
        ("", s.reference, s.similarity, (CODED,)) for s in last.similar_studies]
    assert all(s.reference.startswith("prior-") for s in last.similar_studies)
    raw = Path(outcomes[4].sr_path).read_bytes()
    assert not any(uid.encode() in raw for uid in world.uids[:4])
    with world.engine.connect() as c:
        run = c.execute(select(processing_runs).where(processing_runs.c.id == world.run_of[world.uids[4]])).one()
        rows = c.execute(select(slice_embeddings)).all()
    assert run.status == "done" and run.timings["slice_count"] == 2 and run.sr_path
    with world.engine.connect() as c:
        scored = {r.label: r for r in c.execute(select(predictions).where(
            predictions.c.run_id == world.run_of[world.uids[4]])).all()}
    assert set(scored) == {"nodule", CODED} and scored["nodule"].reported == 0 and scored[CODED].reported == 1
    assert len([r for r in rows if r.series_instance_uid is None]) == 5  # one study vector each
    assert len(rows) == 10  # and one series vector each


def test_reprocessing_a_study_replaces_its_vectors_and_never_finds_itself(world):
    run_id = world.run_of[world.uids[0]]
    world.processor.process(run_id)
    world.processor.process(world.run_of[world.uids[1]])
    with world.engine.begin() as c:
        c.execute(update(processing_runs).where(processing_runs.c.id == run_id).values(status="queued"))
    again = world.processor.process(run_id).result
    assert [s.study_instance_uid for s in again.similar_studies] == [world.uids[1]]
    with world.engine.connect() as c:
        study_rows = c.execute(select(slice_embeddings.c.id).where(
            slice_embeddings.c.study_instance_uid == world.uids[0],
            slice_embeddings.c.series_instance_uid.is_(None))).all()
    assert len(study_rows) == 1


def test_index_commands_rebuild_delete_and_count(world, capsys):
    from worker.cli import main
    from worker.slice_evidence import index_book

    for uid in world.uids[:3]:
        world.processor.process(world.run_of[uid])
    config = world.settings.var_dir / "triage.yaml"
    config.write_text(f"var_dir: {world.settings.var_dir}\nslice_evidence: {{config: tiny}}\n")
    book = index_book(world.settings, world.engine, partition="CT-CHEST")  # the CT chest studies' partition
    assert book.path.name == "slices.CT-CHEST.faiss"
    book.path.unlink()
    assert main(["--config", str(config), "index", "rebuild"]) == 0
    assert "3 studies" in capsys.readouterr().out
    assert main(["--config", str(config), "index", "delete", "--study", world.uids[1]]) == 0
    assert main(["--config", str(config), "index", "stats"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "partition CT-CHEST: 2 studies" in out[-2] and "2 studies" in out[-1]
    book = index_book(world.settings, world.engine, partition="CT-CHEST")
    vectors, ids = book.index().vectors_and_ids()
    assert len(ids) == 2
    assert book.neighbours(vectors[0], 5) and world.uids[1] not in {u for u, _ in book.neighbours(vectors[0], 5)}
    assert main(["--config", str(config), "index", "delete", "--study", world.uids[1]]) == 1


def test_neuro_mri_results_get_evidence_and_a_failure_leaves_the_result_alone(world, tmp_path):
    from worker.slice_evidence import add_slice_evidence

    world.processor.process(world.run_of[world.uids[0]])
    files = sorted((world.settings.incoming_dir / world.uids[2]).rglob("*.dcm"))
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    result = TriageResult(study_instance_uid=world.uids[2], priority="routine", findings=())
    item = SimpleNamespace(claim=SimpleNamespace(study_uid=world.uids[2], run_id=None),
                           image_paths={series_uid: files}, timings={}, partition="CT-CHEST")
    with_evidence = add_slice_evidence(world.book, item, result)
    assert [s.study_instance_uid for s in with_evidence.similar_studies] == [world.uids[0]]
    assert with_evidence.similar_studies[0].findings == NODULE_LABELS[::-1]  # the corrected report: latest final
    assert item.timings["slice_embed_s"] > 0

    broken = SimpleNamespace(claim=SimpleNamespace(study_uid="1.2.3", run_id=None),
                             image_paths={"1.2.3.4": [tmp_path / "missing.dcm"]}, timings={})
    assert add_slice_evidence(world.book, broken, result) is result


class _Processor:
    """What the evidence hook reads from a run book (settings and engine)."""

    def __init__(self, settings) -> None:
        self.settings, self.engine = settings, None


def test_evidence_switched_off_costs_nothing(tmp_path):
    from worker.slice_evidence import add_slice_evidence, evidence_for

    settings = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path), "TRIAGE_SLICE_EVIDENCE__ENABLED": "false"})
    processor = _Processor(settings)
    result = TriageResult(study_instance_uid="1.2.3", priority="routine", findings=())
    assert evidence_for(processor) is None
    assert add_slice_evidence(processor, SimpleNamespace(), result) is result
    unconfigured = _Processor(load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path)}))
    assert evidence_for(unconfigured) is None  # full config without weights: no evidence, no model loaded


def test_the_index_is_partitioned_so_a_brain_mr_never_finds_ct_studies(world):
    """Similar studies are searched among studies of the same modality and body region only."""
    from worker.slice_evidence import add_slice_evidence, study_partition

    for uid in world.uids[:3]:  # CT chest studies, indexed under CT-CHEST
        world.processor.process(world.run_of[uid])
    files = sorted((world.settings.incoming_dir / world.uids[3]).rglob("*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert study_partition({"s": headers}) == "CT-CHEST"
    for ds in headers:
        ds.Modality, ds.BodyPartExamined = "MR", "BRAIN"
    assert study_partition({"s": headers}) == "MR-HEAD"  # BRAIN and HEAD are one region

    result = TriageResult(study_instance_uid=world.uids[3], priority="routine", findings=())

    def evidence(partition: str):
        item = SimpleNamespace(claim=SimpleNamespace(study_uid=world.uids[3], run_id=None),
                               image_paths={headers[0].SeriesInstanceUID: files}, timings={}, partition=partition)
        return add_slice_evidence(world.book, item, result).similar_studies

    assert evidence("MR-HEAD") == ()  # the same pictures, filed as a brain MR: no CT is similar to it
    assert len(evidence("CT-CHEST")) == 2  # among CT chests, its neighbours are found
