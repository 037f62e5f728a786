"""CT studies of two clearly different kinds, received and reported, for the slice_knn pipeline tests."""
from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import insert, select

from pacs_bridge.assembly import CompletionPolicy, StudyAssembler
from pacs_bridge.bookkeeping import ReceivedInstance, write_batch
from pacs_bridge.intake import check_received
from pacs_bridge.rules import RuleSet
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from sql.report_schema import ground_truth_labels, reports
from sql.schema import processing_runs, studies, utcnow
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
