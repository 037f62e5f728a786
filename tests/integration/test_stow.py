"""STOW-RS into our HTTP API with dicomweb-client: the same store, quarantine, assembly and routing as C-STORE,
and the per-instance response of PS3.18 (ReferencedSOPSequence, FailedSOPSequence with FailureReason)."""
from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid
from sqlalchemy import select

from sql.schema import events, instances, processing_runs, series, studies
from tests.support.dicom_factory import mr_slice
from tests.support.intake import phantom, receiver_for
from tests.support.processes import free_port, wait_for
from worker.api.app import create_app

pytestmark = pytest.mark.needs_dcmtk

SENDER, READER = "stow-sender-token", "radiologist-token"
RULES = [{"name": "brain-mr", "pipeline": "neuro_mri", "lane": "urgent",
          "match": {"all": [{"tag": "Modality", "equals": "MR"}, {"tag": "BodyPartExamined", "equals": "BRAIN"}]}}]


class ApiServer:
    """The API under uvicorn in a thread, on a free port (its lifespan starts STOW-RS's bookkeeper)."""

    def __init__(self, settings) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ApiServer":
        self.thread.start()
        wait_for(lambda: self.server.started, 30, what="the API to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, token: str = SENDER) -> DICOMwebClient:
        client = DICOMwebClient(url=f"{self.url}/dicom-web", headers={"Authorization": f"Bearer {token}"})
        client.set_http_retry_params(retry=False)
        return client


def _tokens(folder: Path) -> list[dict]:
    (folder / "sender.token").write_text(SENDER)
    (folder / "reader.token").write_text(READER)
    return [{"name": "modality", "role": "sender", "token_file": str(folder / "sender.token")},
            {"name": "dr", "role": "radiologist", "token_file": str(folder / "reader.token")}]


@pytest.fixture
def deployment(tmp_path):
    """A receiver (SCP, bookkeeper, assembler) and the API on one database and store."""
    receiver = receiver_for(tmp_path, routing={"rules": RULES}, api={"tokens": _tokens(tmp_path)}).start()
    with ApiServer(receiver.settings) as api:
        yield receiver, api
    receiver.stop()


def _held(receiver, study_uid: str) -> int:
    with receiver.engine.connect() as c:
        return c.execute(select(studies.c.instance_count).where(studies.c.study_instance_uid == study_uid)).scalar() \
            or 0


def _paths(receiver) -> dict[str, str]:
    with receiver.engine.connect() as c:
        return dict(c.execute(select(instances.c.sop_instance_uid, instances.c.path)).all())


def _study_record(receiver, study_uid: str) -> dict:
    """What the bookkeeping holds of a study, with nothing that depends on the way in or the deployment."""
    with receiver.engine.connect() as c:
        study = c.execute(select(studies).where(studies.c.study_instance_uid == study_uid)).one()
        rows = c.execute(select(series.c.series_instance_uid, series.c.modality, series.c.series_description,
                                instances.c.sop_instance_uid, instances.c.transfer_syntax_uid)
                         .select_from(series.join(instances, instances.c.series_id == series.c.id))
                         .where(series.c.study_id == study.id)).all()
        run = c.execute(select(processing_runs.c.pipeline, processing_runs.c.lane, processing_runs.c.routing,
                               processing_runs.c.study_version).where(processing_runs.c.study_id == study.id)).one()
        routing = c.execute(select(events.c.detail).where(events.c.kind == "routing")
                            .where(events.c.study_instance_uid == study_uid)).scalar_one()
    return {
        "study": (study.status, study.version, study.instance_count, study.modalities, study.study_description,
                  study.patient_sex, study.patient_age, study.study_date, study.accession_number),
        "instances": sorted(tuple(r) for r in rows),
        "run": tuple(run), "routing": {k: routing[k] for k in ("rule", "pipeline", "lane", "why")},
    }


def _both_ways(study, deployment, folder: Path):
    """The study stored by STOW-RS into ``deployment``, and sent by storescu to a second deployment; both
    completed and routed. Returns the two receivers."""
    stow_receiver, api = deployment
    response = api.client().store_instances([pydicom.dcmread(p) for p in study.files])
    assert len(response.ReferencedSOPSequence) == len(study.files) and len(response.FailedSOPSequence) == 0
    wait_for(lambda: _held(stow_receiver, study.study_instance_uid) == len(study.files), 30,
             what="the STOW-RS instances in the database")
    stow_receiver.complete()

    store_receiver = receiver_for(folder, routing={"rules": RULES}).start()
    try:
        store_receiver.send(study.folder)
        store_receiver.complete()
    finally:
        store_receiver.stop()
    return stow_receiver, store_receiver


def test_a_study_stored_by_stow_rs_is_received_and_routed_exactly_like_one_sent_by_c_store(tmp_path_factory,
                                                                                              deployment):
    study = phantom("tumour", 21, ("AX T2 FLAIR", "AX DWI"))
    stow_receiver, store_receiver = _both_ways(study, deployment, tmp_path_factory.mktemp("c-store"))

    by_stow, by_store = _study_record(stow_receiver, study.study_instance_uid), \
        _study_record(store_receiver, study.study_instance_uid)
    assert by_stow == by_store  # same study record, same series and instances, same routing and run
    # The same datasets kept, element for element (the file meta header is each transport's own).
    stow_paths, store_paths = _paths(stow_receiver), _paths(store_receiver)
    assert stow_paths.keys() == store_paths.keys() == {str(pydicom.dcmread(p).SOPInstanceUID) for p in study.files}
    for uid, path in stow_paths.items():
        assert pydicom.dcmread(path) == pydicom.dcmread(store_paths[uid])
    assert by_stow["routing"]["rule"] == "brain-mr" and by_stow["run"][:2] == ("neuro_mri", "urgent")
    with stow_receiver.engine.connect() as c:
        sources = set(c.execute(select(series.c.source)).scalars())
    assert sources == {"stow-rs"}
    assert len(stow_receiver.dispatched) == len(store_receiver.dispatched) == 1


def test_a_bad_part_is_reported_failed_and_the_good_parts_are_kept(deployment):
    receiver, api = deployment
    study_uid, series_uid = generate_uid(), generate_uid()
    good = [mr_slice(study_uid, series_uid, i) for i in range(3)]
    bad = mr_slice(study_uid, series_uid, 3)
    bad.PixelData = bad.PixelData[:-600]  # cut short in transit

    response = api.client().store_instances(good + [bad])

    assert sorted(item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence) == \
        sorted(ds.SOPInstanceUID for ds in good)
    [failed] = response.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == bad.SOPInstanceUID
    assert failed.ReferencedSOPClassUID == bad.SOPClassUID
    assert failed.FailureReason == 0xC000  # Error: cannot understand
    wait_for(lambda: _held(receiver, study_uid) == 3, 30, what="the good instances in the database")
    [sidecar] = (receiver.settings.quarantine_dir).glob("*.json")
    assert "pixel data is truncated" in sidecar.read_text() and "stow-rs" in sidecar.read_text()


def test_stow_rs_needs_a_sender_token_and_multipart_dicom(deployment):
    receiver, api = deployment
    ds = mr_slice(generate_uid(), generate_uid(), 0)
    with pytest.raises(requests.HTTPError) as unauthenticated:
        api.client(token="wrong").store_instances([ds])
    assert unauthenticated.value.response.status_code == 401
    with pytest.raises(requests.HTTPError) as reader:
        api.client(token=READER).store_instances([ds])
    assert reader.value.response.status_code == 403
    bare = requests.post(f"{api.url}/dicom-web/studies", data=b"\0" * 200, timeout=10,
                         headers={"Authorization": f"Bearer {SENDER}", "Content-Type": "application/dicom"})
    assert bare.status_code == 415


def test_stow_rs_to_a_study_refuses_instances_of_another_study(deployment):
    receiver, api = deployment
    target, other = generate_uid(), generate_uid()
    mine, stray = mr_slice(target, generate_uid(), 0), mr_slice(other, generate_uid(), 0)
    response = api.client().store_instances([mine, stray], study_instance_uid=target)
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [mine.SOPInstanceUID]
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in response.FailedSOPSequence] == \
        [(stray.SOPInstanceUID, 0xA900)]
    with pytest.raises(requests.HTTPError) as none_stored:
        api.client().store_instances([stray], study_instance_uid=target)
    assert none_stored.value.response.status_code == 409


@pytest.mark.slow
def test_a_study_stored_by_stow_rs_is_processed_into_the_same_result_as_one_sent_by_c_store(tmp_path_factory,
                                                                                             deployment):
    """The worker's real pipeline on both, with a tiny model of random weights: the same predictions, to the last
    digit, and the same SR content show that the model saw the same images."""
    from models.bundle import random_bundle, save_bundle
    from pacs_bridge.sr import read_sr
    from sql.schema import predictions
    from worker.pipelines.neuro_mri import NeuroMriPipeline
    from worker.run_book import RunBook

    bundle_dir = tmp_path_factory.mktemp("bundle")
    bundle = random_bundle("tiny", seed=0)
    save_bundle(bundle_dir, bundle.vqvae, bundle.prima, bundle.manifest)
    study = phantom("tumour", 21, ("AX T2 FLAIR", "AX DWI"))
    receivers = _both_ways(study, deployment, tmp_path_factory.mktemp("c-store"))

    results = []
    for receiver in receivers:
        receiver.settings.model.bundle, receiver.settings.model.device = str(bundle_dir), "cpu"
        processor = NeuroMriPipeline(RunBook(receiver.settings, receiver.engine, enqueue_delivery=lambda _id: None))
        [(run_id, _, _)] = receiver.dispatched
        outcome = processor.process(run_id)
        assert outcome.status == "done"
        with receiver.engine.connect() as c:
            probabilities = sorted(c.execute(select(predictions.c.kind, predictions.c.label,
                                                    predictions.c.probability)).all())
        results.append((probabilities, read_sr(pydicom.dcmread(outcome.sr_path))))
    (by_stow, sr_stow), (by_store, sr_store) = results
    assert by_stow == by_store and len(by_stow) > 52
    assert (sr_stow.priority, sr_stow.findings, sr_stow.referrals) == \
        (sr_store.priority, sr_store.findings, sr_store.referrals)
