"""The SCU side: pynetdicom's reactor race, the gate that closes it, and resending what was not acknowledged.

The race (described in :mod:`pacs_bridge.pynetdicom_requestor`) needs the reactor thread to be descheduled at one
point and the sending thread at another, which a loaded machine does now and then. Here that scheduling is forced
at exactly those points, against a real peer over TCP (dcmtk's storescp, or a pynetdicom SCP), so every run
meets the race.
"""
from __future__ import annotations

import inspect
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association

from pacs_bridge import association, pynetdicom_requestor
from pacs_bridge.dicom_send import DeliveryError, DicomDestination, c_store
from pacs_bridge.intake import STATUS_SUCCESS
from tests.support.dicom_factory import mr_slice
from tests.support.processes import free_port, start_process, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.needs_dcmtk]


# --- real peers ------------------------------------------------------------------------------------------------
@pytest.fixture
def storescp(tmp_path):
    """dcmtk's storescp on a free loopback port; yields (destination, output folder)."""
    binary = shutil.which("storescp")
    if binary is None:
        pytest.skip("dcmtk is not installed (run ops/setup.sh)")
    port, out = free_port(), tmp_path / "storescp"
    out.mkdir()
    process = start_process([binary, "-aet", "STORESCP", "-od", str(out), str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), 10, what="storescp to listen")
        yield DicomDestination("archive", "127.0.0.1", port, "STORESCP"), out
    finally:
        process.kill()
        process.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _held(folder: Path) -> list[str]:
    """SOP Instance UIDs of the files storescp wrote (one per file)."""
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sorted(folder.iterdir())]


class StallingPeer:
    """A pynetdicom SCP that stores by SOP Instance UID and answers the listed instances late (or never in time)."""

    def __init__(self, stall: dict[str, int], stall_s: float) -> None:
        self.stall, self.stall_s = dict(stall), stall_s  # UID -> how many receptions to answer late
        self.received: list[str] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="STALLER")
        ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            self.received.append(uid)
            late = self.stall.get(uid, 0) > 0
            if late:
                self.stall[uid] -= 1
        if late:
            time.sleep(self.stall_s)  # stored, but the answer comes after the sender stopped waiting
        return STATUS_SUCCESS

    @property
    def destination(self) -> DicomDestination:
        return DicomDestination("staller", "127.0.0.1", self.port, "STALLER")

    def stop(self) -> None:
        self.server.shutdown()


# --- forced scheduling at the two points of the race -----------------------------------------------------------
class DescheduledReactor:
    """Wraps an association's reactor checkpoint to force the race's scheduling, without fixed sleeps.

    The reactor, once past its checkpoint, is not run again until a sender has cleared the checkpoint, sent its
    request and the answer is in the DIMSE queue (a reactor thread the OS did not run meanwhile); the sender, once
    its request has left, is not run again until the reactor has looked at the queue (a descheduled sender). A
    reactor that is really parked never looks, and the sender goes on after ``give_up_s``.
    """

    def __init__(self, assoc: Association, give_up_s: float = 0.4, answer_within_s: float = 10.0) -> None:
        self.assoc, self.inner = assoc, assoc._reactor_checkpoint
        self.give_up_s, self.answer_within_s = give_up_s, answer_within_s
        self.cleared, self.sent, self.polled = threading.Event(), threading.Event(), threading.Event()
        send_msg, get_msg = assoc.dimse.send_msg, assoc.dimse.get_msg

        def descheduled_sender(primitive, context_id):
            self.polled.clear()
            self.sent.set()
            send_msg(primitive, context_id)
            self.polled.wait(self.give_up_s)

        def observed_get(block: bool = False):
            message = get_msg(block=block)
            if not block and threading.current_thread() is self.assoc:
                self.polled.set()
            return message

        assoc.dimse.send_msg, assoc.dimse.get_msg = descheduled_sender, observed_get

    def set(self) -> None:
        self.cleared.clear()
        self.sent.clear()
        self.inner.set()

    def is_set(self) -> bool:
        return self.inner.is_set()

    def clear(self) -> None:
        self.cleared.set()
        self.inner.clear()

    def wait(self, timeout: float | None = None) -> bool:
        passed = self.inner.wait(timeout)
        if (threading.current_thread() is self.assoc and self.cleared.wait(self.give_up_s)
                and self.sent.wait(self.give_up_s)):
            deadline = time.monotonic() + self.answer_within_s
            while self.assoc.dimse.peek_msg()[1] is None and time.monotonic() < deadline:
                time.sleep(0.001)
        return passed


def _descheduled(assoc: Association) -> Association:
    assoc._reactor_checkpoint = DescheduledReactor(assoc)
    return assoc


def _race_prone(assoc: Association) -> Association:
    """An association as pynetdicom makes it (no gate), with the race's scheduling forced."""
    return _descheduled(assoc)


def _gated_race_prone(assoc: Association) -> Association:
    """The same scheduling forced on an association that has our gate."""
    return _descheduled(pynetdicom_requestor.install_reactor_gate(assoc))


def _send_each(destination: DicomDestination, datasets: list, make: callable) -> list[int | None]:
    ae = AE(ae_title="TRIAGE")
    ae.dimse_timeout = 2
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = make(ae.associate(destination.host, destination.port, ae_title=destination.ae_title))
    assert assoc.is_established
    statuses = []
    for ds in datasets:
        statuses.append(getattr(assoc.send_c_store(ds), "Status", None) if assoc.is_established else None)
    if assoc.is_established:
        assoc.release()
    return statuses


def _series(n: int) -> list:
    study, series = generate_uid(), generate_uid()
    return [mr_slice(study, series, i) for i in range(n)]


# --- the adapter -----------------------------------------------------------------------------------------------
def test_the_reactor_adapter_is_pinned_to_the_pynetdicom_it_was_read_against():
    assert pynetdicom.__version__ == pynetdicom_requestor.VERIFIED_VERSION, (
        "pynetdicom changed: read Association._run_reactor and the send_* handshake again, then update "
        "pacs_bridge/pynetdicom_requestor.py and VERIFIED_VERSION")
    reactor = inspect.getsource(Association._run_reactor)
    assert "self._reactor_checkpoint.wait()" in reactor and "self.dimse.get_msg(block=False)" in reactor
    assert "while not self._is_paused" in inspect.getsource(Association.send_c_store)


def test_pynetdicom_alone_loses_a_c_store_answer_to_its_reactor_when_the_threads_are_descheduled(storescp, caplog):
    destination, held = storescp
    datasets = _series(3)
    statuses = _send_each(destination, datasets, _race_prone)
    # An answer is taken by the reactor (the message users saw), the sender waits out its DIMSE timeout and
    # aborts: that object and every later one go unacknowledged ...
    assert "Received unexpected C-STORE service message" in caplog.text
    assert None in statuses
    lost = statuses.index(None)
    assert statuses[:lost] == [STATUS_SUCCESS] * lost and statuses[lost:] == [None] * (len(datasets) - lost)
    # ... though the peer stored the object whose answer was lost.
    assert sorted(_held(held)) == sorted(str(d.SOPInstanceUID) for d in datasets[:lost + 1])


def test_with_the_gate_every_answer_reaches_its_sender_under_the_same_scheduling(storescp):
    destination, held = storescp
    datasets = _series(3)
    assert _send_each(destination, datasets, _gated_race_prone) == [STATUS_SUCCESS] * 3
    assert sorted(_held(held)) == sorted(str(d.SOPInstanceUID) for d in datasets)


# --- the sender ------------------------------------------------------------------------------------------------
def test_the_sender_gates_every_association_it_makes_and_sends_without_nagle_delay(storescp, monkeypatch):
    made, no_delay = [], []
    real = association.pynetdicom_requestor.install_reactor_gate

    def observed(assoc: Association) -> Association:
        no_delay.append(assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        made.append(real(assoc))
        return assoc

    monkeypatch.setattr(association.pynetdicom_requestor, "install_reactor_gate", observed)
    destination, _ = storescp
    c_store(destination, _series(2), timeout_s=10)
    assert [type(a._reactor_checkpoint) for a in made] == [pynetdicom_requestor.ReactorGate]
    assert no_delay == [1]


def test_a_thousand_c_stores_on_one_association_all_get_their_answer(storescp):
    """No forced scheduling: stock pynetdicom lost 1 and 4 of these 1000 answers in two runs on an idle machine."""
    destination, held = storescp
    datasets = _series(1000)
    assert association.c_store(destination, datasets, calling_aet="TRIAGE", timeout_s=5,
                               error=DeliveryError) == 1
    assert len(_held(held)) == 1000


def test_answers_lost_to_the_race_are_resent_and_every_object_is_acknowledged_once(storescp, monkeypatch):
    # The race forced on the first association, which has no gate: the sender alone must survive it.
    made: list[Association] = []
    gate = association.pynetdicom_requestor.install_reactor_gate

    def race_prone_first(assoc: Association) -> Association:
        made.append(assoc)
        return _race_prone(assoc) if len(made) == 1 else gate(assoc)

    monkeypatch.setattr(association.pynetdicom_requestor, "install_reactor_gate", race_prone_first)
    destination, held = storescp
    datasets = _series(3)
    associations = association.c_store(destination, datasets, calling_aet="TRIAGE", timeout_s=2,
                                       error=DeliveryError)
    assert associations == len(made) == 2
    # Every object is held by the peer under its own UID, none missing and none extra.
    assert sorted(set(_held(held))) == sorted(str(d.SOPInstanceUID) for d in datasets)


def test_a_peer_that_answers_one_object_too_late_gets_it_again_on_a_new_association():
    datasets = _series(4)
    late = str(datasets[1].SOPInstanceUID)
    peer = StallingPeer({late: 1}, stall_s=2.5)
    try:
        associations = association.c_store(peer.destination, datasets, calling_aet="MR1", timeout_s=1,
                                           error=DeliveryError)
    finally:
        peer.stop()
    assert associations == 2
    uids = [str(d.SOPInstanceUID) for d in datasets]
    # Sent once each, except the one whose answer was lost: sent again, nothing after it skipped.
    assert peer.received == [uids[0], late, late, uids[2], uids[3]]


def test_a_peer_that_never_answers_one_object_is_named_with_what_was_not_acknowledged():
    datasets = _series(3)
    stuck = str(datasets[1].SOPInstanceUID)
    peer = StallingPeer({stuck: 10}, stall_s=1.5)
    try:
        with pytest.raises(DeliveryError) as caught:
            c_store(peer.destination, datasets, timeout_s=1)
    finally:
        peer.stop()
    message = str(caught.value)
    assert message.startswith("staller: no response to C-STORE of " + stuck)
    assert f"STALLER@127.0.0.1:{peer.port}" in message
    assert "2 of 3 object(s) not acknowledged after 3 association(s)" in message
    # Bounded: the first association acknowledged one object and lost the next; two more lost it again.
    assert peer.received.count(stuck) == association.ATTEMPTS



class LateQueryPeer:
    """A pynetdicom C-FIND SCP holding ``studies``; its first ``late`` queries are answered after ``late_s``."""

    def __init__(self, studies: list[str], late: int, late_s: float) -> None:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        self.studies, self.late, self.late_s, self.queries = studies, late, late_s, 0
        ae = AE(ae_title="QRSCP")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, self._on_find)])

    def _on_find(self, event: evt.Event):
        self.queries += 1
        if self.queries <= self.late:
            time.sleep(self.late_s)
        for uid in self.studies:
            identifier = pydicom.Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = uid
            identifier.StudyDate = "20240101"
            yield 0xFF00, identifier

    def stop(self) -> None:
        self.server.shutdown()


def test_a_c_find_whose_answer_stops_is_sent_again_and_its_whole_answer_used():
    """Pull's query (and likewise its C-MOVE and C-GET) gets its whole answer from a second association."""
    from pacs_bridge.pull import DimseSource, find_studies_dimse

    studies = [generate_uid() for _ in range(3)]
    peer = LateQueryPeer(studies, late=1, late_s=2.5)
    try:
        found = find_studies_dimse(DimseSource("pacs", "127.0.0.1", peer.port, "QRSCP"), "TRIAGE",
                                   "20240101-20240101", None, timeout_s=1)
    finally:
        peer.stop()
    assert sorted(s.study_instance_uid for s in found) == sorted(studies)
    assert peer.queries == 2


def test_a_c_find_that_is_never_answered_in_time_names_the_source_and_the_bound():
    from pacs_bridge.pull import DimseSource, PullError, find_studies_dimse

    peer = LateQueryPeer([generate_uid()], late=99, late_s=1.5)
    try:
        with pytest.raises(PullError) as caught:
            find_studies_dimse(DimseSource("pacs", "127.0.0.1", peer.port, "QRSCP"), "TRIAGE",
                               "20240101-20240101", None, timeout_s=1)
    finally:
        peer.stop()
    assert str(caught.value) == ("pacs: C-FIND for 20240101-20240101 timed out or the association was aborted "
                                 f"({association.ATTEMPTS} association(s) with QRSCP@127.0.0.1:{peer.port})")
    assert peer.queries == association.ATTEMPTS
