"""HL7 v2 ORU^R01 final reports over MLLP: a real socket client, a real listener, real Postgres.

Accepted reports land with their labels and the patient's groups; malformed messages get an AR acknowledgement
and are kept on disk and in the database with the reason; a resend is acknowledged but not stored twice.
"""
from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from models.labeller import KeywordLabeller
from pacs_bridge.hl7_intake import (
    MllpReportListener,
    ReportIntake,
    decode_message,
    parse_message,
    report_from_oru,
)
from sql.database import make_engine
from sql.report_schema import ground_truth_labels, hl7_messages, reports, study_attributes
from sql.schema import events
from tests.support.hl7 import POLICY, STUDY_UID, MllpClient, add_study, msa, oru  # noqa: F401 (the fixture)
from train.fairness.store import link_reports_to_studies


@pytest.fixture
def listener(engine, tmp_path):
    intake = ReportIntake(engine, POLICY, tmp_path / "hl7", labeller=KeywordLabeller(), application="TRIAGE",
                          facility="GENERAL")
    listener = MllpReportListener(intake, host="127.0.0.1", port=0).start()
    yield listener
    listener.stop()


@pytest.fixture
def client(listener):
    client = MllpClient(listener.port)
    yield client
    client.close()


def test_oru_over_mllp_lands_as_a_labelled_report_of_its_study(engine, client):
    add_study(engine)

    ack = client.send(oru())

    assert msa(ack)[1:3] == ["AA", "MSG0001"]
    assert ack.startswith("MSH|^~\\&|TRIAGE|GENERAL|RIS|GENERAL|") and "|ACK^R01^ACK|" in ack
    with engine.connect() as connection:
        report = connection.execute(select(reports)).one()
        labels = dict(connection.execute(select(ground_truth_labels.c.label, ground_truth_labels.c.value)
                                         .where(ground_truth_labels.c.report_id == report.id)).all())
        attrs = connection.execute(select(study_attributes)).one()
        logged = connection.execute(select(hl7_messages)).one()
    assert report.study_instance_uid == STUDY_UID and report.accession_number == "ACC1001"
    assert report.status == "F" and report.source == "hl7" and report.source_message_id == "MSG0001"
    assert "subdural hematoma" in report.text and report.text.count("\n") == 2
    # OBR-22 without an offset is London time: 14:30 GMT in January.
    assert report.reported_at == datetime(2026, 1, 6, 14, 30, tzinfo=UTC)
    assert labels == {"trauma_subdural_hematoma": 1, "structural_midline_shift": 0, "trauma_brain_contusion": -1}
    assert (attrs.study_instance_uid, attrs.sex, attrs.age_band, attrs.ethnic_group) == (STUDY_UID, "F", "65-79",
                                                                                         "white")
    assert (attrs.region, attrs.density_quartile, attrs.insurance_class, attrs.scheduling) == ("north", "Q1",
                                                                                               "public", "weekday")
    assert logged.status == "accepted" and logged.ack_code == "AA" and logged.report_id == report.id
    assert logged.path is None  # accepted messages are not kept raw: they hold identifiers


def test_malformed_messages_get_application_reject_and_are_kept(engine, client, listener, tmp_path):
    malformed = {
        "not HL7 at all": b"hello, this is not an HL7 message",
        "an ADT, not an ORU": oru(control_id="BAD2").replace("ORU^R01^ORU_R01", "ADT^A01^ADT_A01").encode(),
        "a report without text": oru(control_id="BAD3", text=" "),
        "an impossible examination time": oru(control_id="BAD4", observed="20261345"),
        "neither accession nor study UID": oru(control_id="BAD5", accession=""),
    }
    acks = {name: client.send(message) for name, message in malformed.items()}

    for name, ack in acks.items():
        assert msa(ack)[1] == "AR", name
    # MSA-3 carries the reason, HL7-escaped (\\S\\ is the component separator ^).
    assert msa(acks["an ADT, not an ORU"])[2:4] == ["BAD2", "MSH-9 message type 'ADT\\S\\A01' is not ORU\\S\\R01"]
    assert "OBR-7" in msa(acks["an impossible examination time"])[3]
    kept = sorted((tmp_path / "hl7" / "rejected").rglob("*.hl7"))
    assert len(kept) == len(malformed)
    assert {path.read_bytes() for path in kept} == {m if isinstance(m, bytes) else m.encode()
                                                    for m in malformed.values()}
    reasons = [path.with_name(path.name.replace(".hl7", ".reason.txt")).read_text() for path in kept]
    assert all(reason.startswith("AR: ") for reason in reasons)
    with engine.connect() as connection:
        logged = connection.execute(select(hl7_messages).order_by(hl7_messages.c.id)).all()
        rejects = connection.execute(select(events).where(events.c.kind == "hl7_reject")).all()
        assert connection.execute(select(reports)).all() == []
    assert [row.status for row in logged] == ["rejected"] * len(malformed)
    assert all(row.reason and row.path and row.sha256 for row in logged)
    assert len(rejects) == len(malformed)
    # The connection survives its rejects: a good message after them is accepted.
    assert msa(client.send(oru(control_id="GOOD6")))[1] == "AA"


def test_a_block_without_its_start_character_is_rejected_and_kept(client, tmp_path):
    ack = client.send(oru(control_id="NOVT"), framed=False)
    # Without the start block the bytes are still an HL7 message; framing errors are tolerated, not fatal.
    assert msa(ack)[1] == "AA"
    ack = client.send(b"\x00\x01binary junk", framed=False)
    assert msa(ack)[1] == "AR"
    assert len(list((tmp_path / "hl7" / "rejected").rglob("*.hl7"))) == 1


def test_a_resent_message_is_acknowledged_but_stored_once(engine, client):
    first, second = client.send(oru()), client.send(oru())
    assert msa(first)[1] == msa(second)[1] == "AA"
    with engine.connect() as connection:
        assert len(connection.execute(select(reports)).all()) == 1
        assert [row.reason for row in connection.execute(select(hl7_messages).order_by(hl7_messages.c.id))] == [
            None, "duplicate of an earlier message"]


def test_a_report_before_its_images_is_linked_when_the_study_arrives(engine, client):
    assert msa(client.send(oru(accession="EARLY1", control_id="E1")))[1] == "AA"
    with engine.connect() as connection:
        assert connection.execute(select(reports.c.study_instance_uid)).scalar_one() is None
    add_study(engine, uid="1.2.3.4.5", accession="EARLY1")
    with engine.begin() as connection:
        linked = link_reports_to_studies(connection)
    with engine.connect() as connection:
        assert connection.execute(select(reports.c.study_instance_uid)).scalar_one() == "1.2.3.4.5"
        assert connection.execute(select(study_attributes.c.study_instance_uid)).scalar_one() == "1.2.3.4.5"
    assert linked == 2


def test_storage_failure_is_an_application_error_and_the_message_is_kept(tmp_path):
    broken = make_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/no_such_database_triage")
    intake = ReportIntake(broken, POLICY, tmp_path / "hl7", labeller=KeywordLabeller())
    listener = MllpReportListener(intake, port=0).start()
    try:
        client = MllpClient(listener.port)
        ack = client.send(oru(control_id="AE1"))
        client.close()
    finally:
        listener.stop()
        broken.dispose()
    assert msa(ack)[1] == "AE" and "could not store the report" in msa(ack)[3]
    assert len(list((tmp_path / "hl7" / "error").rglob("*.hl7"))) == 1


def test_oru_fields_study_uid_escapes_and_status():
    message = oru(text="Findings: meningioma\\T\\edema \\.br\\ No hydrocephalus.", status="C",
                  extra="ZDS|1.2.840.113619.2.55.3.1^RIS^Application^DICOM")
    report = report_from_oru(parse_message(decode_message(message.replace("\r", "\n").encode())), POLICY)
    assert report.study_instance_uid == "1.2.840.113619.2.55.3.1"
    assert report.text == "Findings: meningioma&edema \n No hydrocephalus."
    assert report.status == "C" and report.accession_number == "ACC1001"
    assert report.exam_at == datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def test_the_dicom_edge_intake_imports_no_model_code():
    code = ("import sys, pacs_bridge.hl7_intake, pacs_bridge.report_intake; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'models', 'train', 'worker')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
