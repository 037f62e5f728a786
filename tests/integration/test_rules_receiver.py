"""Routing rules in the running receiver: studies sent with storescu are routed by the rule that matches."""
from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import CTImageStorage
from sqlalchemy import func, select, update

from sql.schema import deliveries, events, instances, processing_runs, studies
from tests.support.intake import our_sr, phantom, receiver_for
from tests.support.routing import DESTINATIONS, RULES, _test_files

pytestmark = pytest.mark.needs_dcmtk


@pytest.fixture
def receiver(tmp_path):
    r = receiver_for(tmp_path, routing={"rules": RULES}, destinations=DESTINATIONS,
                     assembly={"quiet_period_s": 30, "expected_series_settle_s": 0.5}).start()
    yield r
    r.stop()


def _routing_events(receiver) -> dict[str, dict]:
    with receiver.engine.connect() as c:
        rows = c.execute(select(events.c.study_instance_uid, events.c.reason, events.c.detail)
                         .where(events.c.kind == "routing")).all()
    return {r.study_instance_uid: {"reason": r.reason, **r.detail} for r in rows}


def test_received_studies_are_routed_by_the_rule_that_matches_and_the_event_says_why(receiver, tmp_path):
    mr = phantom("normal", 5, ("AX T2 FLAIR", "AX DWI"))
    files = _test_files()
    receiver.send(mr.folder)
    receiver.send(files["ct"], files["cr"], aet="RADIOLOGY")
    receiver.complete()

    routed = _routing_events(receiver)
    ct_uid = str(pydicom.dcmread(files["ct"], stop_before_pixels=True).StudyInstanceUID)
    cr_uid = str(pydicom.dcmread(files["cr"], stop_before_pixels=True).StudyInstanceUID)
    assert routed[mr.study_instance_uid]["rule"] == "brain-mr"
    assert routed[mr.study_instance_uid]["lane"] == "urgent"
    assert "BodyPartExamined 'BRAIN'" in routed[mr.study_instance_uid]["reason"]
    assert routed[cr_uid]["rule"] == "chest-radiograph" and routed[cr_uid]["pipeline"] == "slice_knn"
    assert routed[ct_uid]["rule"] == "ct-not-yet"
    with receiver.engine.connect() as c:
        runs = {r.pipeline: r for r in c.execute(select(processing_runs)).all()}
        status = dict(c.execute(select(studies.c.study_instance_uid, studies.c.status)).all())
        forwards = c.execute(select(deliveries)).all()
    assert set(runs) == {"neuro_mri", "slice_knn"} and runs["neuro_mri"].lane == "urgent"
    assert runs["neuro_mri"].routing["rule"] == "brain-mr"
    assert status[ct_uid] == "ignored"
    assert sorted(receiver.dispatched, key=lambda d: d[1]) == [
        (runs["neuro_mri"].id, "neuro_mri", "urgent"), (runs["slice_knn"].id, "slice_knn", "routine")]
    # The CT is not processed but is forwarded on routing, its image as received.
    [forward] = forwards
    assert (forward.kind, forward.stage, forward.destination) == ("images", "before", "research")
    with receiver.engine.connect() as c:
        stored = c.execute(select(instances.c.path).where(instances.c.sop_class_uid == CTImageStorage)).scalars().all()
    assert forward.files == stored
    assert pydicom.dcmread(forward.files[0]).PixelData == pydicom.dcmread(files["ct"]).PixelData
    assert receiver.forwarded == [forward.id]


def test_our_own_sr_never_triggers_processing_nor_forwarding(receiver, tmp_path):
    mr = phantom("normal", 5, ("AX T2 FLAIR", "AX DWI"))
    receiver.send(mr.folder)
    receiver.complete()
    with receiver.engine.begin() as c:  # processed: the worker has written and delivered its SR
        c.execute(update(studies).values(status="done"))
        c.execute(update(processing_runs).values(status="done"))
    sr = our_sr(list(mr.files), tmp_path / "sr")
    receiver.send(sr, aet="PACS")  # the PACS routes our SR back to us
    alone = our_sr(list(phantom("tumour", 6, ("AX T2 FLAIR",)).files), tmp_path / "alone")
    receiver.send(alone, aet="PACS")  # an SR of a study we never received (the catch-all rule would match it)
    receiver.complete(after_s=7200)

    with receiver.engine.connect() as c:
        study = c.execute(select(studies).where(studies.c.study_instance_uid == mr.study_instance_uid)).one()
        other = c.execute(select(studies).where(studies.c.study_instance_uid != mr.study_instance_uid)).one()
        n_runs = c.execute(select(func.count()).select_from(processing_runs)).scalar_one()
        n_deliveries = c.execute(select(func.count()).select_from(deliveries)).scalar_one()
    assert (study.status, study.version) == ("done", 1)  # not re-opened by the SR
    assert study.instance_count == len(mr.files) + 1  # the SR is kept
    assert other.status == "ignored" and other.pipeline == "ignore"
    assert _routing_events(receiver)[other.study_instance_uid]["rule"] == "loop-prevention"
    assert n_runs == 1 and n_deliveries == 0 and len(receiver.dispatched) == 1


def test_expected_series_complete_a_study_before_its_quiet_period(receiver):
    complete = phantom("normal", 5, ("AX T2 FLAIR", "AX DWI"))
    partial = phantom("infarct", 7, ("AX T2 FLAIR",))  # no DWI yet
    receiver.send(complete.folder)
    receiver.send(partial.folder)
    receiver.complete(after_s=2)  # far inside the 30 s quiet period

    with receiver.engine.connect() as c:
        status = dict(c.execute(select(studies.c.study_instance_uid, studies.c.status)).all())
        reason = c.execute(select(events.c.reason).where(events.c.kind == "completion")).scalar_one()
    assert status == {complete.study_instance_uid: "queued", partial.study_instance_uid: "receiving"}
    assert "all expected series of rule 'brain-mr' present" in reason
    receiver.complete(after_s=31)
    with receiver.engine.connect() as c:
        assert c.execute(select(studies.c.status).where(
            studies.c.study_instance_uid == partial.study_instance_uid)).scalar_one() == "queued"


@pytest.mark.parametrize("engine", ["pynetdicom", "dcmtk"])
def test_a_rule_on_the_calling_ae_title_sets_the_studys_own_quiet_period(tmp_path, engine):
    rules = [{"name": "from-research", "pipeline": "neuro_mri", "quiet_period_s": 120,
              "match": {"all": [{"tag": "calling_aet", "equals": "RESEARCH"},
                                {"tag": "called_aet", "regex": "^TRIAGE"}]}},
             *RULES]
    receiver = receiver_for(tmp_path, routing={"rules": rules}, destinations=DESTINATIONS,
                            assembly={"quiet_period_s": 10}, scp={"engine": engine}).start()
    try:
        mr = phantom("normal", 5, ("AX T2 FLAIR", "AX DWI"))
        receiver.send(mr.folder, aet="RESEARCH", called="TRIAGE_NEURO")
        receiver.complete(after_s=60)  # past the default 10 s, inside the rule's 120 s
        with receiver.engine.connect() as c:
            assert c.execute(select(studies.c.status)).scalar_one() == "receiving"
        receiver.complete(after_s=121)
        routed = _routing_events(receiver)[mr.study_instance_uid]
        assert routed["rule"] == "from-research"
        assert "calling_aet 'RESEARCH' equals 'RESEARCH'" in routed["reason"]
        assert "called_aet 'TRIAGE_NEURO' matches" in routed["reason"]
    finally:
        receiver.stop()
