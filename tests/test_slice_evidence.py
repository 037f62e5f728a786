"""Slice evidence in the worker: the slice_knn pipeline end to end (received CT studies -> kNN findings, similar
prior studies with their confirmed findings, an SR that carries them), the neuro_mri hook, the index table and
`triage index rebuild|delete|stats`. The tiny MedImageInsight configuration with seeded random weights."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import insert, select, update

from pacs_bridge.assembly import CompletionPolicy, StudyAssembler
from pacs_bridge.bookkeeping import ReceivedInstance, write_batch
from pacs_bridge.intake import check_received
from pacs_bridge.results import TriageResult
from pacs_bridge.rules import RuleSet
from pacs_bridge.sr import read_sr
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from sql.report_schema import ground_truth_labels, reports
from sql.schema import predictions, processing_runs, studies, utcnow
from sql.slice_index_schema import slice_embeddings
from worker.config import load_settings
from worker.pipelines.slice_knn import SliceKnnPipeline
from worker.run_book import RunBook

# Two kinds of CT study whose pictures differ clearly: a bright disc ("nodule") or horizontal bands ("normal").
KINDS = ("nodule", "normal", "nodule", "normal", "nodule")
# A nodule study's report labels: one the SR code table knows (it becomes a finding) and one it does not (scored,
# kept out of the SR's findings).
CODED = "tumor_adult_meningioma"
NODULE_LABELS = (CODED, "nodule")


def _ct_slice(study_uid: str, series_uid: str, index: int, kind: str, seed: int) -> Dataset:
    rng = np.random.default_rng(seed * 100 + index)
    yy, xx = np.mgrid[0:64, 0:64]
    if kind == "nodule":
        image = np.where((yy - 32) ** 2 + (xx - 30) ** 2 < 15 ** 2, 1200, 0)
    else:
        image = np.where((yy // 8) % 2 == 0, 900, 100)
    image = (image + rng.normal(0, 40, (64, 64)) + 24).clip(0, 4000).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "CT", "CHEST", 2, index + 1
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.AccessionNumber = "TEST^KNN", "K1", "20260101", f"A{seed}"
    ds.StudyDescription, ds.BodyPartExamined = "CT CHEST", "CHEST"
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 2.5 * index]
    ds.PixelSpacing, ds.SliceThickness, ds.Rows, ds.Columns = [1, 1], 2.5, 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = image.tobytes()
    return ds


@pytest.fixture
def world(tmp_path):
    settings = load_settings(environ={
        "TRIAGE_VAR_DIR": str(tmp_path / "var"), "TRIAGE_SLICE_EVIDENCE__CONFIG": "tiny",
        "TRIAGE_SLICE_EVIDENCE__DEVICE": "cpu", "TRIAGE_SLICE_EVIDENCE__MAX_SLICES_PER_SERIES": "2",
        "TRIAGE_SLICE_EVIDENCE__K": "1", "TRIAGE_SLICE_EVIDENCE__EVIDENCE_K": "2",
        "TRIAGE_SLICE_EVIDENCE__PRIORITY_OF_FINDINGS": f"{{{CODED}: urgent}}",
        "TRIAGE_WORKER__BATCH_SIZE": "1",
    })
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    store = InstanceStore(settings.incoming_dir, settings.quarantine_dir)
    uids = []
    for seed, kind in enumerate(KINDS):
        study_uid, series_uid = generate_uid(), generate_uid()
        items = []
        for i in range(3):
            data_path = tmp_path / f"s{seed}_{i}.dcm"
            _ct_slice(study_uid, series_uid, i, kind, seed).save_as(data_path, enforce_file_format=True)
            data = data_path.read_bytes()
            header = check_received(data)
            stored = store.store(study_uid, series_uid, header.sop_instance_uid, data)
            items.append(ReceivedInstance(header=header, stored=stored, calling_aet="CT1"))
        with engine.begin() as connection:
            write_batch(connection, items)
        uids.append(study_uid)
    # routed as a site would: CT to the slice_knn pipeline
    rules = RuleSet.from_config({"rules": [{"name": "ct-knn", "match": {"tag": "Modality", "equals": "CT"},
                                            "pipeline": "slice_knn"}]})
    StudyAssembler(engine, lambda *a, **k: None, CompletionPolicy(0, 600), rules=rules).check_once(
        utcnow() + timedelta(seconds=1))
    with engine.begin() as connection:
        assert set(connection.execute(select(processing_runs.c.pipeline)).scalars()) == {"slice_knn"}
        run_of = dict(connection.execute(
            select(studies.c.study_instance_uid, processing_runs.c.id)
            .select_from(processing_runs.join(studies, studies.c.id == processing_runs.c.study_id))).all())
        # the first three studies have final reports; one of the nodule studies' reports was corrected later
        for seed in range(3):
            for status, label in (("F", KINDS[seed]),) + ((("C", "nodule"),) if seed == 0 else ()):
                report_id = connection.execute(insert(reports).values(
                    study_instance_uid=uids[seed], status=status, reported_at=utcnow() + timedelta(minutes=seed),
                    received_at=utcnow(), text=f"{label}.", source="synthetic",
                    source_message_id=f"m{seed}{status}")).inserted_primary_key[0]
                for name in (NODULE_LABELS if label == "nodule" else ()):
                    connection.execute(insert(ground_truth_labels).values(
                        report_id=report_id, label=name, value=1, source="synthetic", created_at=utcnow()))
    book = RunBook(settings, engine, enqueue_delivery=lambda delivery_id: None)
    processor = SliceKnnPipeline(book)
    yield SimpleNamespace(settings=settings, engine=engine, uids=uids, run_of=run_of, processor=processor, book=book)
    engine.dispose()


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
