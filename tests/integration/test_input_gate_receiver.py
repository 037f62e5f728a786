"""The input gate in the running receiver and worker: studies sent with storescu that are inadequate are not
analysed."""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_bridge import codes
from pacs_bridge.results import NotAnalysed
from pacs_bridge.sr import read_outcome
from sql.schema import deliveries, events, processing_runs, studies
from tests.support.input_gate import EXPECTED, FULL
from tests.support.intake import phantom, receiver_for

pytestmark = pytest.mark.needs_dcmtk


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
    from worker.run_book import RunBook

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
    processor = PlantedLesionProcessor(RunBook(receiver.settings, receiver.engine, enqueue_delivery=enqueued.append))
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
    from worker.run_book import RunBook

    processor = PlantedLesionProcessor(RunBook(receiver.settings, receiver.engine, enqueue_delivery=lambda _: None))
    processor.planted = PlantedLesionModel({})
    assert processor.process(run_id).status == "not_analysed"
    with receiver.engine.connect() as c:
        run = c.execute(select(processing_runs).where(processing_runs.c.id == run_id)).one()
    assert run.status == "not_analysed" and run.sr_path is None and run.delivered_at is not None
