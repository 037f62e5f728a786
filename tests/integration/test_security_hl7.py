"""The MLLP report listener against hostile and broken peers: real listener, raw sockets, real Postgres.

A final ORU takes its study off the worklist and its text becomes training ground truth, so who may send one
matters; and an MLLP sender resends an unacknowledged (or AE'd) message before any later one, so every framed
message must be answered with a code that lets the feed go on.
"""
from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest
from sqlalchemy import select

from models.labeller import KeywordLabeller
from pacs_bridge.hl7_intake import MllpReportListener, ReportIntake, send_messages
from pacs_bridge.hl7_senders import MllpLimits, SenderAllowList, mllp_tls_context
from sql.report_schema import hl7_messages, reports
from tests.support.hl7 import POLICY, MllpClient, add_study, msa, oru  # noqa: F401 (fixture)
from tests.support.pki import TestPKI
from tests.support.processes import wait_for

RIS_ONLY = [{"application": "RIS", "facility": "GENERAL", "hosts": ["127.0.0.0/8"]}]


@pytest.fixture
def start_listener(engine, tmp_path):
    started = []

    def start(senders=None, limits=None, tls=None) -> MllpReportListener:
        intake = ReportIntake(engine, POLICY, tmp_path / "hl7", labeller=KeywordLabeller(), application="TRIAGE",
                              facility="GENERAL", senders=SenderAllowList.from_config(senders))
        listener = MllpReportListener(intake, port=0, limits=limits, ssl_context=mllp_tls_context(tls)).start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


def _rejected(tmp_path) -> list[str]:
    return sorted(p.with_name(p.name.replace(".hl7", ".reason.txt")).read_text()
                  for p in (tmp_path / "hl7" / "rejected").rglob("*.hl7"))


def _closed_by_listener(sock: socket.socket, within_s: float) -> bool:
    """Whether the listener closes ``sock`` (without answering) within ``within_s`` seconds."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except (socket.timeout, TimeoutError):
        return False


# --- who may send ----------------------------------------------------------------------------------------------

def test_a_final_report_from_a_sender_not_on_the_allow_list_is_rejected_and_not_stored(engine, start_listener,
                                                                                       tmp_path):
    add_study(engine)
    listener = start_listener(senders=RIS_ONLY)
    client = MllpClient(listener.port)
    try:
        forged = client.send(oru(control_id="EVIL1").replace("|RIS|GENERAL|", "|EVILAPP|GENERAL|", 1))
        wrong_facility = client.send(oru(control_id="EVIL2").replace("|RIS|GENERAL|", "|RIS|ELSEWHERE|", 1))
        genuine = client.send(oru(control_id="GOOD1"))
    finally:
        client.close()
    assert msa(forged)[1] == msa(wrong_facility)[1] == "AR"
    assert "not an allowed sender" in msa(forged)[3]
    assert msa(genuine)[1] == "AA"
    with engine.connect() as connection:  # only the genuine report became a report (and ground truth)
        assert connection.execute(select(reports.c.source_message_id)).scalars().all() == ["GOOD1"]
    kept = _rejected(tmp_path)  # both forgeries are kept, with the reason an operator reads
    assert len(kept) == 2 and all(r.startswith("AR: ") and "not an allowed sender" in r for r in kept)


def test_a_connection_from_an_address_no_sender_uses_is_closed_unread(engine, start_listener):
    listener = start_listener(senders=[{"application": "RIS", "hosts": ["127.0.0.2/32"]}])
    outsider = socket.create_connection(("127.0.0.1", listener.port), source_address=("127.0.0.1", 0))
    try:
        outsider.sendall(b"\x0b" + oru(control_id="OUT1").encode() + b"\x1c\r")
        assert _closed_by_listener(outsider, 10)
    finally:
        outsider.close()
    insider = socket.create_connection(("127.0.0.1", listener.port), source_address=("127.0.0.2", 0))
    client = MllpClient.__new__(MllpClient)
    client.sock, client.buffer = insider, b""
    try:
        assert msa(client.send(oru(control_id="IN1")))[1] == "AA"
    finally:
        client.close()
    with engine.connect() as connection:
        assert connection.execute(select(reports.c.source_message_id)).scalars().all() == ["IN1"]
    assert listener.refused_connections == 1


def test_tls_listener_serves_trusted_clients_and_refuses_plain_and_certificateless_ones(engine, start_listener,
                                                                                        tmp_path):
    pki = TestPKI(tmp_path / "pki")
    server, ris = pki.issue("triage-mllp", server=True), pki.issue("ris")
    listener = start_listener(tls={"cert": str(server.cert), "key": str(server.key), "ca": str(pki.ca),
                                   "require_client_cert": True})
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    trusted.load_cert_chain(str(ris.cert), str(ris.key))
    assert msa(send_messages("127.0.0.1", listener.port, [oru(control_id="TLS1")], timeout=10,
                             ssl_context=trusted)[0])[1] == "AA"

    plain = socket.create_connection(("127.0.0.1", listener.port))
    try:  # a plain-TCP sender gets no acknowledgement: its bytes are not a TLS handshake
        plain.sendall(b"\x0b" + oru(control_id="PLAIN1").encode() + b"\x1c\r")
        plain.settimeout(10)
        try:
            answer = plain.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert b"MSA" not in answer
    finally:
        plain.close()
    anonymous = ssl.create_default_context(cafile=str(pki.ca))  # trusts the server, presents no certificate
    # TLS 1.3: the client learns of the refusal after its handshake, when the listener closes instead of answering.
    with pytest.raises((ssl.SSLError, ConnectionError, TimeoutError, OSError, asyncio.IncompleteReadError)):
        send_messages("127.0.0.1", listener.port, [oru(control_id="ANON1")], timeout=10, ssl_context=anonymous)
    with engine.connect() as connection:
        assert connection.execute(select(reports.c.source_message_id)).scalars().all() == ["TLS1"]


# --- every framed message gets the right acknowledgement -------------------------------------------------------

def test_broken_messages_are_answered_ar_kept_with_their_reason_and_the_feed_goes_on(engine, start_listener,
                                                                                     tmp_path):
    listener = start_listener()
    client = MllpClient(listener.port)
    try:
        truncated = client.send("MSH|^~\\&|RIS")
        overflow = client.send(oru(control_id="OVER1", reported="99991231235959-1200"))
        nul = client.send(oru(control_id="NUL1", text="Acute subdural\x00 hematoma."))
        after = client.send(oru(control_id="NEXT1"))
    finally:
        client.close()
    # Permanent errors: AR (AE would make the sender resend the same message for ever, blocking the feed).
    assert msa(truncated)[1] == "AR" and "truncated" in msa(truncated)[3]
    assert msa(overflow)[1:3] == ["AR", "OVER1"] and "OBR-22" in msa(overflow)[3]
    assert msa(nul)[1:3] == ["AR", "NUL1"] and "NUL" in msa(nul)[3]
    assert msa(after)[1] == "AA"
    kept = _rejected(tmp_path)
    assert len(kept) == 3 and all(reason.startswith("AR: ") for reason in kept)
    with engine.connect() as connection:
        statuses = connection.execute(select(hl7_messages.c.status, hl7_messages.c.ack_code)
                                      .order_by(hl7_messages.c.id)).all()
    assert [tuple(row) for row in statuses] == [("rejected", "AR")] * 3 + [("accepted", "AA")]


def test_enhanced_mode_senders_get_commit_acknowledgements(engine, start_listener):
    listener = start_listener()
    client = MllpClient(listener.port)
    try:
        # MSH-15 (accept acknowledgement type) AL: enhanced mode.
        good = client.send(oru(control_id="ENH1").replace("|P|2.5|||||||", "|P|2.5|||AL|NE|||", 1))
        bad = client.send(oru(control_id="ENH2", text=" ").replace("|P|2.5|||||||", "|P|2.5|||AL|NE|||", 1))
    finally:
        client.close()
    assert msa(good)[1] == "CA" and msa(bad)[1] == "CR"


# --- limits on the listener -------------------------------------------------------------------------------------

def test_a_dripped_message_is_cut_off_after_the_message_timeout(start_listener):
    listener = start_listener(limits=MllpLimits(message_timeout_s=2.0, idle_timeout_s=60.0))
    sock = socket.create_connection(("127.0.0.1", listener.port))
    started = time.monotonic()
    closed = False
    try:
        sock.settimeout(0.5)
        for byte in b"\x0b" + oru().encode():  # one byte every 0.3 s: each read is quick, the message never ends
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except (socket.timeout, TimeoutError):
                pass
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            if time.monotonic() - started > 15:
                break
    finally:
        sock.close()
    assert closed and time.monotonic() - started < 8


def test_an_idle_connection_is_closed_and_connections_are_limited(start_listener):
    listener = start_listener(limits=MllpLimits(max_connections=2, idle_timeout_s=2.0))
    first, second = (socket.create_connection(("127.0.0.1", listener.port)) for _ in range(2))
    try:
        wait_for(lambda: listener.open_connections == 2, 30, what="the listener to hold both connections")
        third = socket.create_connection(("127.0.0.1", listener.port))
        assert _closed_by_listener(third, 5)  # over the limit: closed at once
        third.close()
        assert _closed_by_listener(first, 10) and _closed_by_listener(second, 10)  # silent: closed when idle
    finally:
        first.close()
        second.close()
    client = MllpClient(listener.port)  # the slots are free again
    try:
        assert msa(client.send(oru(control_id="AFTER1")))[1] == "AA"
    finally:
        client.close()
