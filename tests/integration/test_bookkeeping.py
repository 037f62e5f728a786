"""The bookkeeping batch writer on SQLite and PostgreSQL: what a batch records, whatever its size and order."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from pacs_bridge.bookkeeping import EventRecord, ReceivedInstance, write_batch
from pacs_bridge.intake import InstanceHeader
from pacs_bridge.storage import StoredInstance
from sql.database import make_engine
from sql.schema import events, instances, series, studies

MR = "1.2.840.10008.5.1.4.1.1.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def engine(bookkeeping_url):
    engine = make_engine(bookkeeping_url)
    yield engine
    engine.dispose()


def received(study: str, series_uid: str, sop: str, content: str = "a", modality: str = "MR",
             sop_class: str = MR, aet: str = "MODALITY") -> ReceivedInstance:
    header = InstanceHeader(
        study_instance_uid=study, series_instance_uid=series_uid, sop_instance_uid=sop, sop_class_uid=sop_class,
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality=modality, series_description="AX FLAIR",
        series_number=1, manufacturer="", study_attributes={"AccessionNumber": "ACC1", "PatientSex": "F"},
    )
    stored = StoredInstance(Path(f"/store/{sop}.dcm"), 100, content * 64, is_new=True, replaced=False)
    return ReceivedInstance(header=header, stored=stored, calling_aet=aet)


def write(engine, items) -> None:
    with engine.begin() as connection:
        write_batch(connection, items)


def counts(engine):
    with engine.connect() as c:
        study_rows = c.execute(select(studies.c.study_instance_uid, studies.c.instance_count, studies.c.version,
                                      studies.c.status, studies.c.modalities)).all()
        series_rows = dict(c.execute(select(series.c.series_instance_uid, series.c.instance_count)).all())
        n_instances = c.execute(select(func.count()).select_from(instances)).scalar_one()
    return {row[0]: tuple(row[1:]) for row in study_rows}, series_rows, n_instances


def test_a_batch_records_each_instance_once_with_counts_per_series_and_study(engine):
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(4)]
    batch = [received(study, s1, sops[0]), received(study, s1, sops[1]), received(study, s2, sops[2]),
             received(study, s1, sops[0]),  # the same copy twice in one batch
             received(study, s2, sops[3], modality="CT"),
             EventRecord(kind="quarantine", reason="test", study_instance_uid=study)]
    write(engine, batch)
    study_rows, series_rows, n = counts(engine)
    assert n == 4
    assert study_rows == {study: (4, 1, "receiving", "CT\\MR")}
    assert series_rows == {s1: 2, s2: 2}

    write(engine, batch[:3])  # re-sent identical copies change nothing
    assert counts(engine) == (study_rows, series_rows, 4)

    write(engine, [received(study, s1, sops[1], content="b")])  # a changed copy replaces the recorded row
    with engine.connect() as c:
        sha = c.execute(select(instances.c.sha256).where(instances.c.sop_instance_uid == sops[1])).scalar_one()
        kinds = c.execute(select(events.c.kind)).scalars().all()
    assert sha == "b" * 64
    assert counts(engine) == (study_rows, series_rows, 4)
    assert kinds == ["quarantine"]


def test_within_a_batch_the_last_copy_of_an_instance_wins(engine):
    study, s1, sop = generate_uid(), generate_uid(), generate_uid()
    write(engine, [received(study, s1, sop, content="a")])
    write(engine, [received(study, s1, sop, content="b"), received(study, s1, sop, content="a")])
    with engine.connect() as c:
        sha = c.execute(select(instances.c.sha256).where(instances.c.sop_instance_uid == sop)).scalar_one()
    assert sha == "a" * 64
    assert counts(engine)[2] == 1


def test_late_images_reopen_a_processed_study_once_and_derived_objects_never(engine):
    study, s1 = generate_uid(), generate_uid()
    write(engine, [received(study, s1, generate_uid()) for _ in range(3)])
    with engine.begin() as c:
        c.execute(update(studies).values(status="done"))

    our_sr = received(study, generate_uid(), generate_uid(), modality="SR", sop_class=COMPREHENSIVE_3D_SR)
    write(engine, [our_sr])
    assert counts(engine)[0][study][1:3] == (1, "done")

    late = [received(study, s1, generate_uid()) for _ in range(2)]
    write(engine, [received(study, generate_uid(), generate_uid(), modality="SR", sop_class=COMPREHENSIVE_3D_SR),
                   *late])
    study_rows, series_rows, n = counts(engine)
    assert study_rows[study][:3] == (7, 2, "receiving")
    with engine.connect() as c:
        reopened = c.execute(select(events.c.sop_instance_uid).where(events.c.kind == "reopened")).scalars().all()
    assert reopened == [late[0].header.sop_instance_uid]


def test_batches_larger_than_one_in_list_are_recorded_whole(engine):
    study, s1 = generate_uid(), generate_uid()
    batch = [received(study, s1, generate_uid()) for _ in range(1200)]
    write(engine, batch)
    write(engine, batch[:700])
    study_rows, series_rows, n = counts(engine)
    assert n == 1200 and series_rows == {s1: 1200} and study_rows[study][0] == 1200
