"""Routing as a router: a rule forwards a study's images, as received, to a second Orthanc after processing when
the AI result says so, through the same reliable delivery as SRs.

What decides here is the result, not the model: the brain-MR model cannot tell a phantom haemorrhage from a
normal phantom unless trained, so the worker's model is replaced by one that reads the planted lesion and answers
priority "high" for the haemorrhage and "none" for the normal study. Everything else is the real service: the SCP
receives both studies from storescu, the assembler routes them, the worker's neuro_mri pipeline loads the volumes,
builds the result by the configured priority map, writes and delivers the SR, and decides the rule's forward on the
result; deliveries run through DeliveryBook into real Orthancs.
"""
from __future__ import annotations

import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from sql.schema import deliveries, events, processing_runs, studies
from tests.support.intake import our_sr, phantom, receiver_for
from tests.support.orthanc import Orthanc
from tests.support.planted_lesion import PlantedLesionModel, PlantedLesionProcessor
from worker.delivery import DeliveryBook
from worker.run_book import RunBook

pytestmark = [pytest.mark.slow, pytest.mark.needs_dcmtk, pytest.mark.needs_orthanc]


@pytest.fixture(scope="module")
def orthancs(tmp_path_factory):
    pacs = Orthanc(tmp_path_factory.mktemp("pacs"), aet="PACS").start()
    oncall = Orthanc(tmp_path_factory.mktemp("oncall"), aet="ONCALL").start()
    yield pacs, oncall
    pacs.stop()
    oncall.stop()


def _destinations(pacs: Orthanc, oncall: Orthanc) -> list[dict]:
    return [
        {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": pacs.aet},
        # The on-call neuroradiology station: forwarded images only, no SRs.
        {"name": "neuro-oncall", "kind": "dicomweb", "url": f"{oncall.url}/dicom-web", "results": False},
    ]


def test_high_priority_study_goes_to_the_oncall_station_after_processing_and_a_normal_one_does_not(
    tmp_path, orthancs
):
    pacs, oncall = orthancs
    rules = [{"name": "brain-mr", "pipeline": "neuro_mri", "match": {"tag": "Modality", "equals": "MR"},
              "forward": [{"to": "neuro-oncall", "stage": "after", "if": {"result": "priority", "equals": "stat"}}]}]
    receiver = receiver_for(tmp_path, routing={"rules": rules}, destinations=_destinations(pacs, oncall),
                            delivery={"backoff_s": 0.01}).start()
    bleed = phantom("subdural_haemorrhage", 11, ("AX T2 FLAIR", "AX DWI"))
    normal = phantom("normal", 12, ("AX T2 FLAIR", "AX DWI"))
    try:
        receiver.send(bleed.folder)
        receiver.send(normal.folder)
        run_ids = receiver.complete()
    finally:
        receiver.stop()
    assert len(run_ids) == 2

    enqueued: list[int] = []
    processor = PlantedLesionProcessor(RunBook(receiver.settings, receiver.engine, enqueue_delivery=enqueued.append))
    processor.planted = PlantedLesionModel({**dict.fromkeys(bleed.series, "subdural_haemorrhage"),
                                            **dict.fromkeys(normal.series, "normal")})
    for run_id in run_ids:  # a run may have been processed already, in a batch with the other
        processor.process(run_id)
    book = DeliveryBook(receiver.settings, receiver.engine)
    assert all(book.attempt(delivery_id).delivered for delivery_id in enqueued)

    # The haemorrhage (priority stat) is on the on-call station, every image as received; the normal study is not.
    assert len(oncall.find_instances(StudyInstanceUID=bleed.study_instance_uid)) == len(bleed.files)
    assert oncall.find_instances(StudyInstanceUID=normal.study_instance_uid) == []
    assert oncall.find_instances(Modality="SR") == []  # the station gets images, not SRs
    # Both SRs went to the PACS, as always.
    for study in (bleed, normal):
        assert len(pacs.find_instances(StudyInstanceUID=study.study_instance_uid, Modality="SR")) == 1

    with receiver.engine.connect() as c:
        rows = c.execute(select(deliveries).where(deliveries.c.kind == "images")).all()
        decisions = c.execute(select(events.c.study_instance_uid, events.c.reason)
                              .where(events.c.kind == "forward")).all()
        priorities = dict(c.execute(
            select(studies.c.study_instance_uid, processing_runs.c.priority)
            .select_from(processing_runs.join(studies, studies.c.id == processing_runs.c.study_id))).all())
    assert priorities == {bleed.study_instance_uid: "stat", normal.study_instance_uid: "routine"}
    [row] = rows
    assert (row.destination, row.stage, row.status, len(row.files)) == ("neuro-oncall", "after", "delivered",
                                                                         len(bleed.files))
    said = {uid: reason for uid, reason in decisions}
    assert "priority 'stat' equals 'stat'" in said[bleed.study_instance_uid]
    assert "not forwarded to neuro-oncall" in said[normal.study_instance_uid]
    assert "no priority equals 'stat' (values: 'routine')" in said[normal.study_instance_uid]


def test_forward_on_routing_sends_the_images_but_never_the_derived_objects(tmp_path, orthancs):
    pacs, oncall = orthancs
    rules = [{"name": "ct-archive", "pipeline": "ignore", "match": {"tag": "Modality", "equals": "CT"},
              "forward": [{"to": "archive", "stage": "before"}]}]
    destinations = [{"name": "archive", "kind": "dicom", "host": "127.0.0.1", "port": oncall.dicom_port,
                     "ae_title": oncall.aet, "results": False}]
    receiver = receiver_for(tmp_path, routing={"rules": rules}, destinations=destinations).start()
    ct = get_testdata_file("CT_small.dcm", download=False)
    try:
        receiver.send(ct)
        receiver.send(our_sr([ct], tmp_path / "sr"), aet="PACS")  # an SR in the same study
        receiver.complete()
    finally:
        receiver.stop()
    book = DeliveryBook(receiver.settings, receiver.engine)
    [delivery_id] = receiver.forwarded
    assert book.attempt(delivery_id).delivered

    assert len(oncall.find_instances(Modality="CT")) == 1
    assert oncall.find_instances(Modality="SR") == []
    with receiver.engine.connect() as c:
        assert c.execute(select(processing_runs)).all() == []  # routed, not processed
        assert c.execute(select(deliveries.c.status)).scalar_one() == "delivered"
