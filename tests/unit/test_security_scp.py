"""The receiver against hostile and broken peers: wrong hosts, stalled connections, unexpected SOP classes,
oversized objects, path-traversal UIDs, malformed datasets and every broken file pydicom's test data ships.

Each test checks what a sender and an operator notice: the DIMSE status, what lies in quarantine, that nothing
was written outside the store, and that a well-behaved sender is still served afterwards.
"""
from __future__ import annotations

import socket
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from pacs_bridge.intake import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from sql.schema import events
from tests.support.dicom_factory import mr_slice
from tests.support.processes import wait_for
from tests.support.raw_dicom import RawStoreSCU, _count, _encode, _quarantined, _storescu, make_receiver  # noqa: F401 (the fixture)

# --- who may connect -------------------------------------------------------------------------------------------

def test_a_known_ae_title_from_the_wrong_host_is_refused_and_from_its_own_host_accepted(make_receiver, tmp_path):
    scp, engine, _ = make_receiver(allowed_calling_aets=[], ae_hosts={"MR1": ["127.0.0.2/32"]})
    ds = mr_slice(generate_uid(), generate_uid(), 0)

    ae = AE(ae_title="MR1")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    wrong_host = ae.associate("127.0.0.1", scp.port, ae_title="TRIAGE", bind_address=("127.0.0.1", 0))
    assert wrong_host.is_rejected and not wrong_host.is_established
    right_host = ae.associate("127.0.0.1", scp.port, ae_title="TRIAGE", bind_address=("127.0.0.2", 0))
    assert right_host.is_established
    assert right_host.send_c_store(ds).Status == STATUS_SUCCESS
    right_host.release()
    # A title that is neither listed nor bound is refused from anywhere.
    intruder = AE(ae_title="INTRUDER")
    intruder.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assert intruder.associate("127.0.0.1", scp.port, ae_title="TRIAGE",
                              bind_address=("127.0.0.2", 0)).is_rejected

    assert scp.bookkeeper.wait_idle()
    assert _count(engine) == 1
    with engine.connect() as c:
        reasons = c.execute(select(events.c.reason).where(events.c.kind == "association_refused")
                            .order_by(events.c.id)).scalars().all()
    # Both refusals are recorded with their reason: the wrong host, and the unknown title.
    assert len(reasons) == 2
    assert "MR1" in reasons[0] and "127.0.0.1" in reasons[0]
    assert "INTRUDER" in reasons[1]


def test_an_unknown_calling_ae_title_is_refused_and_recorded(make_receiver):
    scp, engine, _ = make_receiver(allowed_calling_aets=["PYSCU"])
    intruder = AE(ae_title="INTRUDER")
    intruder.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = intruder.associate("127.0.0.1", scp.port, ae_title="TRIAGE")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.result_str == "Rejected Permanent"
    assert assoc.acceptor.primitive.reason_str == "Calling AE title not recognised"
    assert scp.bookkeeper.wait_idle()
    with engine.connect() as c:
        refused = c.execute(select(events).where(events.c.kind == "association_refused")).one()
    assert "INTRUDER" in refused.reason and refused.detail["peer"] == "127.0.0.1"


# --- association slots -----------------------------------------------------------------------------------------

def _associate(port: int, aet: str = "PYSCU"):
    ae = AE(ae_title=aet)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="TRIAGE")


def test_silent_connections_hold_no_association_slot_and_are_closed_quickly(make_receiver, tmp_path):
    scp, engine, _ = make_receiver(max_associations=2, network_timeout_s=60.0, association_request_timeout_s=2.0)
    # An attacker opens more connections than there are slots and never sends an A-ASSOCIATE-RQ.
    silent = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(6)]
    try:
        time.sleep(0.5)  # the receiver has accepted them all
        assoc = _associate(scp.port)
        assert assoc.is_established, "a legitimate sender was refused while silent connections were open"
        assert assoc.send_c_store(mr_slice(generate_uid(), generate_uid(), 0)).Status == STATUS_SUCCESS
        assoc.release()
        # Each silent connection is closed after the pre-association timeout, not the minute of network_timeout_s.
        started = time.monotonic()
        for sock in silent:
            sock.settimeout(15)
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 10
    finally:
        for sock in silent:
            sock.close()
    assert scp.bookkeeper.wait_idle()
    assert _count(engine) == 1


def test_negotiated_associations_over_the_limit_are_refused_transiently_and_recorded(make_receiver):
    scp, engine, _ = make_receiver(max_associations=2)
    held = [_associate(scp.port) for _ in range(2)]
    assert all(a.is_established for a in held)
    over = _associate(scp.port)
    assert over.is_rejected
    assert over.acceptor.primitive.result_str == "Rejected Transient"
    assert over.acceptor.primitive.reason_str == "Local limit exceeded"
    held.pop().release()

    def established():
        association = _associate(scp.port)
        return association if association.is_established else None

    again = wait_for(established, 30, what="a slot after a release")  # the released thread may take a moment
    assert again.is_established
    again.release()
    held[0].release()
    assert scp.bookkeeper.wait_idle()
    with engine.connect() as c:
        refused = c.execute(select(events.c.reason).where(events.c.kind == "association_refused")).scalars().all()
    assert refused and all("scp.max_associations" in r for r in refused)


def test_ae_bindings_reject_malformed_networks_at_start():
    from pacs_bridge.dicom_tls import PeerBindings

    with pytest.raises(ValueError, match="pacs.example"):
        PeerBindings({"PACS": ["pacs.example"]})
    bindings = PeerBindings({"PACS": ["10.1.0.0/16", "::1"]})
    assert bindings.permits("PACS", "10.1.200.3") and bindings.permits("PACS", "::1")
    assert not bindings.permits("PACS", "10.2.0.1") and bindings.permits("OTHER", "10.2.0.1")
    assert bindings.permits("PACS", "::ffff:10.1.0.9")  # IPv4 peers on a dual-stack socket


# --- slow and stalled peers ------------------------------------------------------------------------------------



# --- what may be sent ------------------------------------------------------------------------------------------



def test_an_oversized_object_is_refused_with_out_of_resources_and_its_head_kept(make_receiver, tmp_path):
    scp, engine, root = make_receiver(max_object_bytes=16_000)
    big = mr_slice(generate_uid(), generate_uid(), 0, rows=128, columns=128)  # 32 KiB of pixels
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="TRIAGE")
    assert assoc.send_c_store(big).Status == STATUS_OUT_OF_RESOURCES
    small = mr_slice(generate_uid(), generate_uid(), 0)
    assert assoc.send_c_store(small).Status == STATUS_SUCCESS  # same association, next object
    assoc.release()
    assert scp.bookkeeper.wait_idle()
    (kept,) = _quarantined(root)
    assert "exceeds scp.max_object_bytes (16000)" in kept["reason"] and kept["status"] == "0xA700"
    assert kept["size_bytes"] <= 64 * 1024
    assert _count(engine) == 1


