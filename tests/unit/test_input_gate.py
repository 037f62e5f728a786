"""The input adequacy gate: a study that does not give the model what it needs is "not analysed", with its reasons,
before the model runs; no priority is raised and nothing is forwarded on an AI result.

The end-to-end cases use the real service parts (storescu -> our SCP -> bookkeeping -> completion and routing on
SQLite and PostgreSQL -> the worker's RunProcessor -> SR, deliveries, publications, forwards); the model is the
planted-lesion reader of test_forwarding (a perfect reader of the phantom), so a complete bleed is "stat".
"""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_bridge import codes
from pacs_bridge.results import NotAnalysed
from pacs_bridge.schema import deliveries, events, processing_runs, studies
from pacs_bridge.sr import read_outcome
from tests.support.intake import phantom, receiver_for
from worker.config import DEFAULTS
from worker.input_gate import GateConfigError, GatePolicy, SeriesInput, assess

FULL = ("AX T2 FLAIR", "AX DWI", "AX DWI ADC")
EXPECTED = ["(?i)flair", "(?i)dwi", "(?i)adc"]


def neuro_policy(**changes) -> GatePolicy:
    return GatePolicy.from_config("neuro_mri", {**DEFAULTS["input_gate"]["neuro_mri"], **changes})


def series(description: str, slices: int = 24, spacing: float = 6.0, modality: str = "MR",
           body_part: str = "BRAIN") -> SeriesInput:
    return SeriesInput(generate_uid(), description, modality, body_part, slices, slices * spacing)


# -- the gate's decisions --------------------------------------------------------------------------------------
def test_a_complete_brain_mr_passes():
    import re

    verdict = assess([series(d) for d in FULL], neuro_policy(), [re.compile(p) for p in EXPECTED])
    assert verdict.adequate and verdict.reasons == ()


def test_one_slice_is_not_enough_and_the_reason_says_how_many_are_needed():
    verdict = assess([series("AX DWI ADC", slices=1)], neuro_policy())
    assert not verdict.adequate and verdict.checks == ("slices",)
    assert "has 1 slice (minimum 12) and 6 mm coverage (minimum 80 mm)" in verdict.reasons[0]


def test_a_missing_required_sequence_is_named():
    import re

    verdict = assess([series("AX T2 FLAIR"), series("AX DWI")], neuro_policy(), [re.compile(p) for p in EXPECTED])
    assert verdict.reasons == ("required series /(?i)adc/ is missing (series present: 'AX T2 FLAIR', 'AX DWI')",)


def test_the_gates_own_required_series_replace_the_rules():
    verdict = assess([series("AX T2 FLAIR")], neuro_policy(required_series=["(?i)swi"]), [])
    assert verdict.checks == ("required_series",)


def test_a_non_brain_mr_and_a_ct_are_not_for_the_brain_model():
    spine = assess([series("SAG T2", body_part="LSPINE")], neuro_policy())
    assert spine.checks == ("body_part",) and "'LSPINE' is not one neuro_mri analyses" in spine.reasons[0]
    ct = assess([series("HEAD 5mm", modality="CT", body_part="HEAD")], neuro_policy())
    assert ct.checks == ("modality",) and "no MR series for neuro_mri (modalities present: CT)" in ct.reasons[0]


def test_a_series_without_body_part_counts_unless_configured_otherwise():
    assert assess([series("AX T2 FLAIR", body_part="")], neuro_policy()).adequate
    assert not assess([series("AX T2 FLAIR", body_part="")], neuro_policy(accept_missing_body_part=False)).adequate


def test_a_bad_gate_configuration_names_the_key():
    with pytest.raises(GateConfigError, match="input_gate.neuro_mri.body_part_regex"):
        neuro_policy(body_part_regex="(unclosed")
    with pytest.raises(GateConfigError, match="unknown keys"):
        neuro_policy(min_slice=3)


def test_slices_and_coverage_come_from_the_headers_geometry():
    from worker.input_gate import read_headers, series_inputs

    study = phantom("normal", 41, ("AX DWI",))  # b0 and b1000 at the same 24 positions, 6 mm apart, 5 mm thick
    by_series: dict[str, list[Path]] = {}
    for path in study.files:
        by_series.setdefault(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID, []).append(path)
    [facts] = series_inputs(read_headers(by_series))
    assert (facts.modality, facts.body_part, facts.slices) == ("MR", "BRAIN", 24)
    assert facts.coverage_mm == pytest.approx(23 * 6.0 + 5.0)


# -- end to end ------------------------------------------------------------------------------------------------
def _copy(files: list[Path], folder: Path, **changes) -> Path:
    """The files under ``folder`` as a study of their own (new study UID), with ``changes`` to every header."""
    folder.mkdir(parents=True)
    study_uid = generate_uid()
    series_uids: dict[str, str] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / path.name, enforce_file_format=True)
    return folder


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    return {} if request.param == "sqlite" else {"url": request.getfixturevalue("postgres_url")}


@pytest.mark.slow
def test_inadequate_studies_are_not_analysed_and_a_complete_one_is_as_before(tmp_path, database):
    from tests.support.planted_lesion import PlantedLesionModel, PlantedLesionProcessor

    rules = [{"name": "brain-mr", "pipeline": "neuro_mri", "lane": "urgent",
              "match": {"tag": "Modality", "equals": "MR"}, "expected_series": EXPECTED,
              "forward": [{"to": "neuro-oncall", "stage": "after", "if": {"result": "priority", "equals": "stat"}}]}]
    destinations = [{"name": "neuro-oncall", "kind": "dicomweb", "url": "http://127.0.0.1:9/dicom-web",
                     "results": False}]
    # A priority raise would be a publication event (failed here: nothing listens on port 9).
    publishers = [{"name": "pager", "kind": "webhook", "url": "http://127.0.0.1:9/hook", "min_priority": "routine",
                   "timeout_s": 0.5}]
    receiver = receiver_for(tmp_path, database=database, routing={"rules": rules}, destinations=destinations,
                            publishers=publishers).start()
    complete = phantom("subdural_haemorrhage", 11, FULL)
    bleed_files = sorted(complete.files)
    one_slice = _copy([next(p for p in bleed_files if "ADC" in str(pydicom.dcmread(p, stop_before_pixels=True)
                                                                     .SeriesDescription))], tmp_path / "one")
    partial = phantom("subdural_haemorrhage", 12, ("AX T2 FLAIR", "AX DWI"))
    spine = _copy(bleed_files, tmp_path / "spine", BodyPartExamined="LSPINE")
    try:
        for folder in (complete.folder, one_slice, partial.folder, spine):
            receiver.send(folder)
        run_ids = receiver.complete()
    finally:
        receiver.stop()
    assert len(run_ids) == 4

    enqueued: list[int] = []
    processor = PlantedLesionProcessor(receiver.settings, receiver.engine, enqueue_delivery=enqueued.append)
    uid_of = {}
    for folder in (one_slice, spine):
        uid_of[folder] = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID
    planted = {}
    for study in (complete, partial):
        planted.update(dict.fromkeys(study.series, "subdural_haemorrhage"))
    processor.planted = PlantedLesionModel(planted)
    for run_id in run_ids:  # a run may have been processed already, in a batch with another
        processor.process(run_id)

    with receiver.engine.connect() as c:
        runs = {r.study_instance_uid: r for r in c.execute(
            select(studies.c.study_instance_uid, studies.c.status.label("study_status"), processing_runs.c.id,
                   processing_runs.c.status, processing_runs.c.priority, processing_runs.c.error,
                   processing_runs.c.sr_path)
            .select_from(processing_runs.join(studies, studies.c.id == processing_runs.c.study_id))).all()}
        forwards = c.execute(select(studies.c.study_instance_uid).select_from(
            deliveries.join(studies, studies.c.id == deliveries.c.study_id)).where(deliveries.c.kind == "images")
        ).scalars().all()
        published = c.execute(select(events.c.study_instance_uid).where(events.c.kind == "publication")
                              ).scalars().all()
        not_analysed = {e.study_instance_uid: e for e in c.execute(select(events).where(
            events.c.kind == "not_analysed")).all()}

    # The complete study is analysed as before: stat, its priority published, its images forwarded.
    bleed = runs[complete.study_instance_uid]
    assert (bleed.status, bleed.study_status, bleed.priority) == ("done", "done", "stat")
    assert complete.study_instance_uid in published and forwards == [complete.study_instance_uid]
    assert read_outcome(pydicom.dcmread(bleed.sr_path)).priority == "stat"

    expected_reasons = {
        uid_of[one_slice]: "has 1 slice (minimum 12)",
        partial.study_instance_uid: "required series /(?i)adc/ is missing",
        uid_of[spine]: "body part examined 'LSPINE' is not one neuro_mri analyses",
    }
    for uid, reason in expected_reasons.items():
        run = runs[uid]
        assert (run.status, run.study_status, run.priority) == ("not_analysed", "not analysed", None), uid
        assert reason in run.error and reason in not_analysed[uid].reason
        assert uid not in published  # no priority raised
        # The SR says so, with the reasons, read back with highdicom.
        ds = pydicom.dcmread(run.sr_path)
        [group] = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()
        assert group.finding_type == codes.NOT_ANALYSED
        outcome = read_outcome(ds)
        assert isinstance(outcome, NotAnalysed) and any(reason in r for r in outcome.reasons)
        assert ds.SeriesDescription.startswith("AI triage NOT ANALYSED")
    assert forwards == [complete.study_instance_uid]  # nothing forwarded on an AI result for the three


def test_without_an_sr_when_so_configured(tmp_path):
    receiver = receiver_for(tmp_path, input_gate={"write_sr": False},
                            routing={"rules": [{"name": "mr", "pipeline": "neuro_mri",
                                                "match": {"tag": "Modality", "equals": "MR"}}]}).start()
    study = phantom("normal", 13, ("AX T2 FLAIR",))
    one = _copy(sorted(study.files)[:1], tmp_path / "one")
    try:
        receiver.send(one)
        [run_id] = receiver.complete()
    finally:
        receiver.stop()
    from tests.support.planted_lesion import PlantedLesionModel, PlantedLesionProcessor

    processor = PlantedLesionProcessor(receiver.settings, receiver.engine, enqueue_delivery=lambda _: None)
    processor.planted = PlantedLesionModel({})
    assert processor.process(run_id).status == "not_analysed"
    with receiver.engine.connect() as c:
        run = c.execute(select(processing_runs).where(processing_runs.c.id == run_id)).one()
    assert run.status == "not_analysed" and run.sr_path is None and run.delivered_at is not None

