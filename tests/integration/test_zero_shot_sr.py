"""Zero-shot findings reach the SR, and the SR passes dciodvfy (dicom3tools): the slice_knn CT pipeline and a
neuro MRI study with a text tower."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes as dcm_codes
from sqlalchemy import select

from models.bundle import load_bundle
from pacs_bridge import codes
from pacs_bridge.assembly import CompletionPolicy, StudyAssembler
from pacs_bridge.sr import read_sr
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from sql.schema import processing_runs, utcnow
from sql.slice_index_schema import slice_embeddings
from tests.support.bundles import text_bundle  # noqa: F401 (the fixture)
from tests.support.slice_evidence import world  # noqa: F401 (the slice_knn CT fixture)
from tests.support.sr_checks import dciodvfy_errors
from tests.support.studies import _receive
from worker.config import load_settings
from worker.pipelines.neuro_mri import NeuroMriPipeline
from worker.run_book import RunBook
from worker.zero_shot import PRIMA_METHOD, SLICE_METHOD, SliceZeroShot, prima_zero_shot_for

pytestmark = pytest.mark.needs_dcmtk


def algorithms_by_tracking_id(path: Path) -> dict[str, str]:
    """Each measurement group's tracking identifier -> its TID 4019 Algorithm Name, read with highdicom."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    out = {}
    for group in sr.content.get_image_measurement_groups():
        name = hd.sr.utils.find_content_items(group[0], name=dcm_codes.DCM.AlgorithmName)[0].TextValue
        out[str(group.tracking_identifier)] = str(name)
    return out


def test_a_slice_knn_ct_gets_zero_shot_findings_combined_with_knn_in_its_sr(world):  # noqa: F811
    outcomes = [world.processor.process(world.run_of[uid], worker_name="cpu0") for uid in world.uids]
    assert [o.status for o in outcomes] == ["done"] * 5

    first, last = outcomes[0].result, outcomes[4].result
    # The first study has no labelled neighbour: its zero-shot scores stand alone; the last has (k = 1): combined.
    assert first.zero_shot.method == SLICE_METHOD and first.zero_shot.findings
    assert not any(p.startswith("knn_weight=") for p in first.zero_shot.parameters)
    assert "knn_weight=0.5" in last.zero_shot.parameters
    assert last.zero_shot.parameters[0] == "prompts=slice_findings"
    with world.engine.connect() as c:
        vector = c.execute(select(slice_embeddings.c.vector).where(
            slice_embeddings.c.study_instance_uid == world.uids[4],
            slice_embeddings.c.series_instance_uid.is_(None))).scalar_one()
    evidence = world.book  # the same embedder the run used: a scorer of the same weights and table
    from worker.slice_evidence import evidence_for
    alone = SliceZeroShot(world.settings, evidence_for(evidence).embedder).score(np.frombuffer(vector, "<f4"))
    # the neighbour's final report carries none of the chest findings: kNN says 0, so half the zero-shot score
    for finding in last.zero_shot.findings:
        assert finding.probability == pytest.approx(0.5 * alone.zero_shot[finding.label], abs=1e-6)
    assert last.findings and last.model_name == "medimageinsight-knn"  # the kNN findings are still there

    decoded = read_sr(pydicom.dcmread(outcomes[4].sr_path))
    assert decoded.zero_shot == last.zero_shot
    assert decoded.findings == last.findings and decoded.model_name == "medimageinsight-knn"
    algorithms = algorithms_by_tracking_id(Path(outcomes[4].sr_path))
    zero_shot_groups = {k: v for k, v in algorithms.items() if k.startswith("zs-")}
    assert len(zero_shot_groups) == len(last.zero_shot.findings)
    assert set(zero_shot_groups.values()) == {SLICE_METHOD}
    assert {v for k, v in algorithms.items() if k.startswith("dx-")} == {"medimageinsight-knn"}
    assert all(codes.label_for_code(codes.code_for_label(f.label)) == f.label for f in last.zero_shot.findings)
    assert dciodvfy_errors(Path(outcomes[4].sr_path)) == []


def test_a_neuro_mri_study_with_a_text_tower_gets_prima_zero_shot_findings_in_its_sr(tmp_path, text_bundle,
                                                                                     tiny_bundle):
    from train.phantoms import write_phantom_study

    folder = write_phantom_study(tmp_path / "phantom", lesion="tumour", seed=61, series=["AX T2 FLAIR"]).folder
    settings = load_settings(environ={
        "TRIAGE_VAR_DIR": str(tmp_path / "var"), "TRIAGE_MODEL__BUNDLE": str(text_bundle),
        "TRIAGE_MODEL__DEVICE": "cpu", "TRIAGE_EXPLAIN__ENABLED": "false", "TRIAGE_WORKER__BATCH_SIZE": "1",
        "TRIAGE_SLICE_EVIDENCE__ENABLED": "false",
    })
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    _receive(engine, InstanceStore(settings.incoming_dir, settings.quarantine_dir), folder)
    StudyAssembler(engine, lambda *a, **k: None, CompletionPolicy(0, 600)).check_once(utcnow() + timedelta(seconds=1))
    with engine.connect() as c:
        run_id = c.execute(select(processing_runs.c.id)).scalar_one()
    processor = NeuroMriPipeline(RunBook(settings, engine, enqueue_delivery=lambda delivery_id: None))

    outcome = processor.process(run_id, worker_name="cpu0")

    assert outcome.status == "done", outcome
    result = outcome.result
    assert result.zero_shot is not None and result.zero_shot.method == PRIMA_METHOD
    assert result.zero_shot.version == result.model_version and result.zero_shot.findings
    assert result.zero_shot.parameters == ("prompts=prima_diagnoses",)
    decoded = read_sr(pydicom.dcmread(outcome.sr_path))
    assert decoded.zero_shot == result.zero_shot and decoded.model_name == "prima"
    algorithms = algorithms_by_tracking_id(Path(outcome.sr_path))
    assert {v for k, v in algorithms.items() if k.startswith("zs-")} == {PRIMA_METHOD}
    assert {v for k, v in algorithms.items() if k.startswith("dx-")} == {"prima"}
    assert dciodvfy_errors(Path(outcome.sr_path)) == []
    # the text embeddings were computed once and cached under the text tower's sha256
    assert len(list((settings.var_dir / "text_embeddings").glob("*.npz"))) == 1
    # a bundle without a text tower gives no zero-shot findings (and builds no scorer)
    assert prima_zero_shot_for(settings, load_bundle(tiny_bundle)) is None
    engine.dispose()
