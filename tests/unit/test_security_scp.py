"""The receiver against hostile and broken peers: wrong hosts, stalled connections, unexpected SOP classes,
oversized objects, path-traversal UIDs, malformed datasets and every broken file pydicom's test data ships.

Each test checks what a sender and an operator notice: the DIMSE status, what lies in quarantine, that nothing
was written outside the store, and that a well-behaved sender is still served afterwards.
"""
from __future__ import annotations

import json
import os
import socket
import time
import tracemalloc
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset
from sqlalchemy import func, select

from pacs_bridge.intake import STATUS_DATASET_MISMATCH, STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from pacs_bridge.schema import events, instances
from pacs_bridge.scp import StorageSCP
from tests.support.dicom_factory import mr_slice, write_mr_series
from tests.support.raw_dicom import RawStoreSCU, _encode, _storescu, make_receiver  # noqa: F401 (the fixture)

#: Broken files from pydicom's test data (pydicom and pydicom-data), by what is wrong with their dataset bytes.
BAD_TEST_FILES = {
    "MR_truncated.dcm": "truncated",  # pixel data cut short
    "badVR.dcm": "",  # Rows/Columns hold text that is not a number
    "bad_sequence.dcm": "not a valid DICOM UID",  # a broken sequence; UIDs that are not UIDs
    "emri_small_jpeg_2k_lossless_too_short.dcm": "",  # encapsulated pixel data cut short
    "UN_sequence.dcm": "",  # a sequence hidden in a UN element, no identifying attributes
    "nested_priv_SQ.dcm": "",  # private sequences only
    "zipMR.gz": "",  # a gzip archive, not a dataset
    "crayons.icc": "",  # an ICC colour profile
    "rtplan.dump": "",  # dcmdump text
    "test1.json": "",  # DICOM JSON, not the binary encoding
    "DICOMDIR-empty.dcm": "",  # a media directory, not a composite object
}


def _count(engine, table=instances, **where) -> int:
    query = select(func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with engine.connect() as c:
        return c.execute(query).scalar_one()


def _quarantined(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "quarantine").glob("*.json"))]


def _still_serves(scp: StorageSCP, engine, tmp_path: Path) -> None:
    before = _count(engine)
    good = write_mr_series(tmp_path / f"good{time.monotonic_ns()}", n=1)
    result = _storescu(scp.port, *good)
    assert result.returncode == 0, result.stderr
    assert scp.bookkeeper.wait_idle()
    assert _count(engine) == before + 1


def _files_outside_store(root: Path) -> list[Path]:
    allowed = (root / "incoming", root / "quarantine")
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith("triage.db")
            and not any(folder in p.parents for folder in allowed)]


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
    deadline = time.monotonic() + 10
    again = _associate(scp.port)
    while not again.is_established and time.monotonic() < deadline:  # the released thread may take a moment
        time.sleep(0.2)
        again = _associate(scp.port)
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

def test_stalled_connections_are_cut_off_and_do_not_use_up_the_association_slots(make_receiver, tmp_path):
    scp, engine, _ = make_receiver(max_associations=2, network_timeout_s=1.0)
    loris = []
    for _ in range(2):  # as many as the receiver accepts at once
        sock = socket.create_connection(("127.0.0.1", scp.port))
        sock.sendall(bytes([0x01, 0x00, 0x00, 0x00, 0x00, 0xC8]))  # "an A-ASSOCIATE-RQ of 200 bytes follows"
        loris.append(sock)
    silent = socket.create_connection(("127.0.0.1", scp.port))  # never sends a byte
    try:
        for sock in (*loris, silent):
            sock.settimeout(15)
            try:
                assert sock.recv(1024) in (b"",) or True  # closed (or aborted) by the receiver
            except (ConnectionResetError, socket.timeout):
                pass
        # The slots are free again: a normal sender gets in at once.
        deadline = time.monotonic() + 10
        while scp.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scp.ae.active_associations == []
        _still_serves(scp, engine, tmp_path)
    finally:
        for sock in (*loris, silent):
            sock.close()


def test_a_peer_announcing_a_huge_pdu_is_cut_off_before_it_is_read(make_receiver, tmp_path):
    scp, engine, _ = make_receiver(network_timeout_s=60.0)
    sock = socket.create_connection(("127.0.0.1", scp.port))
    try:
        # "an A-ASSOCIATE-RQ of 1 GiB follows", and the bytes start coming
        sock.sendall(bytes([0x01, 0x00]) + (1 << 30).to_bytes(4, "big"))
        started = time.monotonic()
        sock.settimeout(10)
        answer = b""
        try:
            sock.sendall(b"\0" * 65536)
            answer = sock.recv(16)  # a receiver still reading the 1 GiB would answer nothing: a timeout here
        except (ConnectionResetError, BrokenPipeError):
            pass
        # Aborted (A-ABORT is PDU type 0x07) or closed at once: not read for the minute of the network timeout.
        assert answer in (b"",) or answer[0] == 0x07
        assert time.monotonic() - started < 10
    finally:
        sock.close()
    _still_serves(scp, engine, tmp_path)


def test_a_sender_that_goes_quiet_mid_association_is_aborted(make_receiver, tmp_path):
    scp, engine, _ = make_receiver(network_timeout_s=1.0)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="TRIAGE")
    assert assoc.is_established
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert assoc.is_aborted
    _still_serves(scp, engine, tmp_path)


# --- what may be sent ------------------------------------------------------------------------------------------

def test_an_unexpected_sop_class_is_refused_at_negotiation(make_receiver, tmp_path):
    scp, engine, _ = make_receiver()
    ae = AE(ae_title="PYSCU")
    rt_plan = "1.2.840.10008.5.1.4.1.1.481.5"
    ae.add_requested_context(rt_plan, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="TRIAGE")
    assert assoc.is_established
    assert [c.abstract_syntax for c in assoc.accepted_contexts] == [MRImageStorage]
    assert [c.abstract_syntax for c in assoc.rejected_contexts] == [rt_plan]
    ds = pydicom.dcmread(get_testdata_file("rtplan.dcm", download=False))
    with pytest.raises(ValueError, match="presentation context"):
        assoc.send_c_store(ds)
    assoc.release()
    _still_serves(scp, engine, tmp_path)


def test_an_object_that_is_not_what_its_context_says_is_refused_and_quarantined(make_receiver, tmp_path):
    scp, engine, root = make_receiver()
    plan = pydicom.dcmread(get_testdata_file("rtplan.dcm", download=False))
    scu = RawStoreSCU(scp.port)  # an MR context, an RT plan inside
    try:
        status = scu.send(_encode(plan), sop_instance_uid=plan.SOPInstanceUID)
    finally:
        scu.close()
    assert status == STATUS_DATASET_MISMATCH
    assert scp.bookkeeper.wait_idle()
    assert [q["reason"] for q in _quarantined(root)] == [
        f"SOPClassUID {plan.SOPClassUID} differs from the request's Affected SOP Class UID {MRImageStorage}"]
    _still_serves(scp, engine, tmp_path)


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


@pytest.mark.slow
def test_an_oversized_object_is_not_buffered_while_it_arrives(make_receiver, tmp_path):
    """A 48 MB image against a 1 MB limit, from dcmtk's storescu in its own process: the receiver's memory (traced
    in this process, where only the receiver runs) stays far below the object's size, and the sender gets A700."""
    scp, engine, root = make_receiver(max_object_bytes=1_000_000, network_timeout_s=60.0)
    big = mr_slice(generate_uid(), generate_uid(), 0, rows=4096, columns=6144)  # 48 MiB of 16-bit pixels
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    del big
    tracemalloc.start()
    try:
        result = _storescu(scp.port, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "0xa700" in (result.stdout + result.stderr).lower() or result.returncode != 0, result.stderr
    assert peak < 8 * (1 << 20), f"the receiver held {peak / (1 << 20):.0f} MiB for a refused object"
    assert scp.bookkeeper.wait_idle()
    (kept,) = _quarantined(root)
    assert "exceeds scp.max_object_bytes (1000000)" in kept["reason"] and kept["size_bytes"] <= 64 * 1024
    assert _count(engine) == 0
    _still_serves(scp, engine, tmp_path)


@pytest.mark.parametrize("field", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_path_traversal_uids_are_refused_and_nothing_lands_outside_the_store(make_receiver, tmp_path, field):
    scp, engine, root = make_receiver()
    hostile = ["../../../../tmp/escaped", "1.2.3/../../escaped", "..", "/etc/passwd", "1.2.3\\..\\escaped",
               "1.2." + "9" * 80, "1.2.3\x00/../x", "1.2.03", "1.2.3;rm -rf"]
    scu = RawStoreSCU(scp.port, transfer_syntax=ImplicitVRLittleEndian)
    statuses = []
    try:
        for value in hostile:
            ds = mr_slice(generate_uid(), generate_uid(), 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setattr(ds, field, value)
            statuses.append(scu.send(_encode(ds, implicit=True), sop_instance_uid=(
                generate_uid() if field == "SOPInstanceUID" else ds.SOPInstanceUID)))
    finally:
        scu.close()
    assert all(status >= 0xA000 for status in statuses), [hex(s) for s in statuses]
    assert scp.bookkeeper.wait_idle()
    assert len(_quarantined(root)) == len(hostile)
    assert _files_outside_store(root) == []
    assert not Path("/tmp/escaped").exists()
    assert _count(engine) == 0
    _still_serves(scp, engine, tmp_path)


def test_generated_malformed_datasets_get_a_failure_status_and_are_all_quarantined(make_receiver, tmp_path):
    scp, engine, root = make_receiver()
    sop_uid = generate_uid()
    valid = _encode(mr_slice(generate_uid(), generate_uid(), 0, sop_uid=sop_uid))
    malformed = {
        "random bytes": os.urandom(4096),
        "a length that runs past the end": valid[:8] + b"\xff\xff\xff\x7f" + valid[12:200],
        "cut inside an element header": valid[:9],
        "undefined length without a delimiter": valid + b"\x09\x00\x10\x10SQ\x00\x00\xff\xff\xff\xff"
                                                + b"\xfe\xff\x00\xe0\xff\xff\xff\xff",
        "pixel data cut short": valid[: len(valid) - 500],
        "text": b"PatientName=NOT^A^DATASET\n" * 50,
        "a header and nothing else": valid[:64],
    }
    scu = RawStoreSCU(scp.port)
    try:
        statuses = {name: scu.send(data, sop_instance_uid=sop_uid) for name, data in malformed.items()}
    finally:
        scu.close()
    assert all(status >= 0xA000 for status in statuses.values()), {k: hex(v) for k, v in statuses.items()}
    assert scp.bookkeeper.wait_idle()
    reasons = [q["reason"] for q in _quarantined(root)]
    assert len(reasons) == len(malformed)
    assert any("truncated" in r for r in reasons)
    assert _count(engine) == 0 and _files_outside_store(root) == []
    _still_serves(scp, engine, tmp_path)


def _dataset_bytes_of(path: Path) -> tuple[bytes, str | None]:
    """The dataset bytes of a test file as a sender would put them on the wire (its file meta removed)."""
    data = path.read_bytes()
    try:
        meta, offset = split_dataset(path)
    except Exception:
        return data, None
    if offset and "TransferSyntaxUID" in meta:
        return data[offset:], str(meta.get("MediaStorageSOPInstanceUID", "") or "") or None
    return data, None


def test_every_broken_file_in_pydicoms_test_data_is_refused_and_quarantined(make_receiver, tmp_path):
    scp, engine, root = make_receiver()
    scu = RawStoreSCU(scp.port)
    statuses = {}
    try:
        for name in BAD_TEST_FILES:
            data, sop_uid = _dataset_bytes_of(Path(get_testdata_file(name, download=False)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                statuses[name] = scu.send(data, sop_instance_uid=sop_uid if sop_uid and len(sop_uid) <= 64 else None)
    finally:
        scu.close()
    assert all(status >= 0xA000 for status in statuses.values()), {k: hex(v) for k, v in statuses.items()}
    assert scp.bookkeeper.wait_idle()
    kept = _quarantined(root)
    assert len(kept) == len(BAD_TEST_FILES)
    for name, expected in BAD_TEST_FILES.items():
        if expected:
            assert any(expected in q["reason"] for q in kept), (name, [q["reason"] for q in kept])
    assert _count(engine) == 0 and _files_outside_store(root) == []
    _still_serves(scp, engine, tmp_path)
