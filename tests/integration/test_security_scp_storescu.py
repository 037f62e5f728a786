"""The receiver under hostile or broken senders, with storescu (dcmtk) as the well-behaved sender beside them:
stalled and dripping peers, oversized and mislabelled objects, path-traversal UIDs, malformed datasets."""
from __future__ import annotations

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

from pacs_bridge.intake import STATUS_DATASET_MISMATCH
from tests.support.dicom_factory import mr_slice
from tests.support.processes import wait_for
from tests.support.raw_dicom import (
    BAD_TEST_FILES,
    RawStoreSCU,
    _count,
    _dataset_bytes_of,
    _encode,
    _files_outside_store,
    _quarantined,
    _still_serves,
    _storescu,
    make_receiver,  # noqa: F401 (the fixture)
)

pytestmark = pytest.mark.needs_dcmtk


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
        wait_for(lambda: not scp.ae.active_associations, 30, what="the association slots to be free")
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
    wait_for(lambda: not assoc.is_established, 30, what="the quiet association to end")
    assert assoc.is_aborted
    _still_serves(scp, engine, tmp_path)


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
