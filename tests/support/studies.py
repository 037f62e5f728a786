"""Studies put into the bookkeeping database as the receiver and the assembler would: received files,
completed runs, an analysed study with its SR, one the model refused."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
from sqlalchemy import insert, select, update

from pacs_bridge.bookkeeping import ReceivedInstance, write_batch
from pacs_bridge.intake import check_received
from pacs_bridge.results import Finding, ImageRegion, TriageResult
from sql.report_schema import study_attributes
from sql.schema import predictions, processing_runs, studies, utcnow


def ingest(engine, files) -> int:
    """Record a study's files as the receiver does and complete it as the assembler does; returns its run."""
    from pacs_bridge.assembly import CompletionPolicy, StudyAssembler
    from pacs_bridge.bookkeeping import ReceivedInstance, write_batch
    from pacs_bridge.intake import check_received
    from pacs_bridge.storage import StoredInstance

    received = []
    for path in files:
        data = Path(path).read_bytes()
        stored = StoredInstance(Path(path), len(data), hashlib.sha256(data).hexdigest(), True, False)
        received.append(ReceivedInstance(check_received(data), stored, "MODALITY"))
    with engine.begin() as c:
        write_batch(c, received)
    dispatched: list[int] = []
    assembler = StudyAssembler(engine, lambda run_id, _: dispatched.append(run_id),
                               CompletionPolicy(quiet_period_s=0.0, max_wait_s=900.0))
    assembler.check_once()
    [run_id] = dispatched
    return run_id


CALLED, NOT_CALLED = "trauma_subdural_hematoma", "structural_mass_effect"


def analysed_study(engine, files: list[Path], sr_dir: Path, sex: str = "F") -> tuple[str, int]:
    """A phantom study recorded as received, then analysed as the pipeline leaves it: STAT, one called finding
    with a region on a source slice (in the SR), one finding below threshold; its group in study_attributes."""
    from pacs_bridge.sr import build_sr

    run_id = ingest(engine, files)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    flair = sorted((d for d in datasets if "FLAIR" in str(d.SeriesDescription).upper()),
                   key=lambda d: int(d.InstanceNumber))
    key = flair[len(flair) // 2]
    square = ((20.0, 20.0), (44.0, 20.0), (44.0, 44.0), (20.0, 44.0), (20.0, 20.0))
    region = ImageRegion(str(key.SOPInstanceUID), str(key.SOPClassUID), str(key.SeriesInstanceUID), square, 0.8)
    study_uid = str(key.StudyInstanceUID)
    result = TriageResult(study_uid, "stat", (Finding(CALLED, 0.999, 0.41, (region,)), Finding(NOT_CALLED, 0.31, 0.5)),
                          model_name="prima", model_version="tiny")
    sr = build_sr(result, datasets, device_uid="1.2.826.0.1.3680043.10.1138.1")
    sr_path = sr_dir / f"{study_uid}.dcm"
    sr_path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(sr_path, enforce_file_format=True)
    with engine.begin() as c:
        c.execute(update(processing_runs).where(processing_runs.c.id == run_id).values(
            status="done", priority="stat", finished_at=utcnow(), model_name="prima", model_version="tiny",
            sr_path=str(sr_path)))
        c.execute(update(studies).where(studies.c.study_instance_uid == study_uid).values(status="done"))
        c.execute(insert(predictions), [
            {"run_id": run_id, "kind": "diagnosis", "label": CALLED, "probability": 0.999, "threshold": 0.41,
             "reported": 1},
            {"run_id": run_id, "kind": "diagnosis", "label": NOT_CALLED, "probability": 0.31, "threshold": 0.5,
             "reported": 1}])
        c.execute(insert(study_attributes).values(study_instance_uid=study_uid, sex=sex, age_band="60-69",
                                                  updated_at=utcnow()))
    return study_uid, run_id


def not_analysed_study(engine, files: list[Path]) -> str:
    """A study the input gate turned away, recorded as the run book records it."""
    run_id = ingest(engine, files)
    reasons = "not analysed: no series matches required sequence 'FLAIR'; series 'ADC' has 1 slice, 20 needed"
    with engine.begin() as c:
        c.execute(update(processing_runs).where(processing_runs.c.id == run_id).values(
            status="not_analysed", finished_at=utcnow(), priority=None, error=reasons))
        study_uid = c.execute(select(studies.c.study_instance_uid).join(
            processing_runs, processing_runs.c.study_id == studies.c.id)
            .where(processing_runs.c.id == run_id)).scalar_one()
        c.execute(update(studies).where(studies.c.study_instance_uid == study_uid).values(status="not analysed"))
    return study_uid


def _receive(engine, store, folder, calling_aet="MODALITY"):
    items = []
    for path in sorted(folder.rglob("*.dcm")):
        data = path.read_bytes()
        header = check_received(data)
        stored = store.store(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid, data)
        items.append(ReceivedInstance(header=header, stored=stored, calling_aet=calling_aet))
    with engine.begin() as connection:
        write_batch(connection, items)
