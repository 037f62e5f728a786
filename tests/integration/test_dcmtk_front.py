"""The dcmtk receiver engine with real peers: storescu and pynetdicom send, storescp receives, we check and book."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import MRImageStorage, Verification
from sqlalchemy import func, select

from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.child_processes import Spawner, command_line, start_time
from pacs_bridge.dcmtk_front import ASSOCIATION_FILE, DcmtkFront
from pacs_bridge.scp import ScpSettings
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from sql.schema import events, instances, series, studies
from tests.support.dicom_factory import mr_slice, write_mr_series
from tests.support.processes import free_port, start_process, wait_for

pytestmark = [
    pytest.mark.skipif(shutil.which("storescp") is None or shutil.which("storescu") is None,
                       reason="dcmtk is not installed (run ops/setup.sh)"),
    pytest.mark.needs_dcmtk,
]

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class Front:
    """A DcmtkFront over a fresh SQLite database and store under one folder; restartable on the same folder."""

    def __init__(self, root, **settings) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{root / 'triage.db'}"
        upgrade(url)
        self.engine = make_engine(url)
        self.settings = ScpSettings(engine="dcmtk", port=free_port(), **settings)
        self.front: DcmtkFront | None = None

    def start(self) -> DcmtkFront:
        store = InstanceStore(self.root / "incoming", self.root / "quarantine")
        bookkeeper = Bookkeeper(self.engine, flush_interval_s=0.05)
        bookkeeper.start()
        self.front = DcmtkFront(self.settings, store, bookkeeper, self.root / "spool")
        self.front.start()
        return self.front

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
            self.front.bookkeeper.stop()
            self.front = None

    def count(self, table=instances) -> int:
        with self.engine.connect() as c:
            return c.execute(select(func.count()).select_from(table)).scalar_one()


@pytest.fixture
def front(tmp_path):
    running = Front(tmp_path / "receiver", allowed_calling_aets=["STORESCU", "PYSCU", "$(touch pwned)"])
    running.start()
    yield running
    running.stop()
    running.engine.dispose()


def storescu(port: int, *files, aet: str = "STORESCU", cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", aet, "-aec", "TRIAGE", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=60, cwd=cwd)


def test_a_series_is_stored_and_recorded_with_its_sender(front, tmp_path):
    files = write_mr_series(tmp_path / "send", n=6)
    result = storescu(front.front.port, *files)
    assert result.returncode == 0, result.stderr
    assert front.front.wait_idle()
    assert front.count() == 6 and front.front.received == 6
    with front.engine.connect() as c:
        row = c.execute(select(series.c.calling_aet, series.c.called_aet, series.c.peer_address,
                               series.c.instance_count)).one()
        paths = c.execute(select(instances.c.path)).scalars().all()
    assert tuple(row) == ("STORESCU", "TRIAGE", "127.0.0.1", 6)
    # Stored under the store's own layout, dataset bytes as sent; the spool is empty again.
    sent = {f.read_bytes()[f.read_bytes().index(b"\x08\x00\x16\x00"):] for f in files}
    for path in paths:
        assert str(path).startswith(str(front.root / "incoming"))
        kept = open(path, "rb").read()
        assert kept[kept.index(b"\x08\x00\x16\x00"):] in sent
    assert [p.name for p in (front.root / "spool").iterdir()] == []
    assert front.front.active.current() == set()


def test_calling_ae_titles_are_checked_before_storescp_sees_the_association(front, tmp_path):
    files = write_mr_series(tmp_path / "send", n=1)
    result = storescu(front.front.port, *files, aet="INTRUDER")
    assert result.returncode != 0 and "Rejected" in (result.stdout + result.stderr)
    assert front.front.wait_idle()
    assert front.count() == 0 and front.front.refused_associations == 1
    with front.engine.connect() as c:
        reasons = c.execute(select(events.c.reason).where(events.c.kind == "association_refused")).scalars().all()
    assert reasons == ["calling AE title INTRUDER is not allowed from 127.0.0.1"]


def test_an_ae_title_bound_to_another_host_is_refused(tmp_path):
    bound = Front(tmp_path / "r", ae_hosts={"STORESCU": ["10.9.9.9"]})
    front = bound.start()
    try:
        files = write_mr_series(tmp_path / "send", n=1)
        assert storescu(front.port, *files).returncode != 0
        assert front.wait_idle() and bound.count() == 0
    finally:
        bound.stop()


def test_a_hostile_calling_ae_title_is_only_data(front, tmp_path):
    """dcmtk's own --exec-on-reception would hand this title to /bin/sh; here it is a string in the database."""
    files = write_mr_series(tmp_path / "send", n=1)
    (tmp_path / "cwd").mkdir()
    assert storescu(front.front.port, *files, aet="$(touch pwned)", cwd=tmp_path / "cwd").returncode == 0
    assert front.front.wait_idle()
    with front.engine.connect() as c:
        assert c.execute(select(series.c.calling_aet)).scalar_one() == "$(touch pwned)"
    assert not list(tmp_path.rglob("pwned")) and not os.path.exists("pwned")


def test_bad_objects_are_quarantined_with_reasons_and_the_receiver_goes_on(front, tmp_path):
    good = write_mr_series(tmp_path / "good", n=1)[0]
    truncated = tmp_path / "truncated.dcm"  # pixel data cut short (storescp stores what it was sent)
    ds = mr_slice(generate_uid(), generate_uid(), 0)
    ds.save_as(truncated, enforce_file_format=True)
    data = truncated.read_bytes()
    pixel_tag = data.rindex(b"\xe0\x7f\x10\x00")
    # shorten the Pixel Data value and its length field consistently: a well-formed but too-short element
    value_length = int.from_bytes(data[pixel_tag + 8:pixel_tag + 12], "little")
    truncated.write_bytes(data[:pixel_tag + 8] + (value_length - 512).to_bytes(4, "little")
                          + data[pixel_tag + 12:len(data) - 512])
    hostile = tmp_path / "hostile.dcm"
    ds = mr_slice(generate_uid(), generate_uid(), 0)
    ds.SOPInstanceUID = "1.2.3/../../../../escaped"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(hostile, enforce_file_format=True)

    for path in (truncated, hostile):
        storescu(front.front.port, path)
    assert storescu(front.front.port, good).returncode == 0  # still serving
    assert front.front.wait_idle()

    sidecars = [json.loads(p.read_text()) for p in sorted((front.root / "quarantine").glob("*.json"))]
    reasons = [s["reason"] for s in sidecars]
    assert any("truncated" in r for r in reasons), reasons
    assert any("not a valid DICOM UID" in r for r in reasons), reasons
    assert all(s["calling_aet"] == "STORESCU" for s in sidecars)
    assert front.count() == 1
    assert not any("escaped" in p.name for p in front.root.rglob("*") if "quarantine" not in p.parts)
    with front.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(events).where(events.c.kind == "quarantine")
                         ).scalar_one() == len(sidecars)


def test_back_pressure_refuses_associations_for_now_and_the_retry_is_stored(front, tmp_path):
    files = write_mr_series(tmp_path / "send", n=2)
    front.front.settings.min_free_bytes = 1 << 62  # "the disk is full"
    result = storescu(front.front.port, *files)
    assert result.returncode != 0 and front.front.deferred == 1
    front.front.settings.min_free_bytes = 0
    front.front.settings.max_backlog = -1  # "the database is far behind"
    assert storescu(front.front.port, *files).returncode != 0 and front.front.deferred == 2
    assert not list((front.root / "incoming").rglob("*.dcm"))
    front.front.settings.max_backlog = 20000
    assert storescu(front.front.port, *files).returncode == 0
    assert front.front.wait_idle() and front.count() == 2


def test_files_left_in_the_spool_by_a_stopped_receiver_are_taken_in_at_the_next_start(tmp_path):
    receiver = Front(tmp_path / "r")
    # What a receiver killed mid-association leaves: a spool folder with its sender and a written file.
    folder = tmp_path / "r" / "spool" / "4242-7"
    folder.mkdir(parents=True)
    (folder / ASSOCIATION_FILE).write_text(json.dumps(
        {"calling_aet": "MR1", "called_aet": "TRIAGE", "peer_address": "10.1.2.3"}))
    shutil.copy(write_mr_series(tmp_path / "send", n=1)[0], folder / "MR.X.1.2.3")
    front = receiver.start()
    try:
        assert front.wait_idle()
        assert receiver.count() == 1 and not folder.exists()
        with receiver.engine.connect() as c:
            assert tuple(c.execute(select(series.c.calling_aet, series.c.peer_address)).one()) == ("MR1",
                                                                                                 "10.1.2.3")
    finally:
        receiver.stop()


def test_tls_is_refused_with_a_clear_error(tmp_path):
    from pacs_bridge.dicom_tls import TlsFiles

    with pytest.raises(ValueError, match="TLS"):
        DcmtkFront(ScpSettings(engine="dcmtk", tls=TlsFiles(cert="c.pem", key="k.pem", ca="")),
                   InstanceStore(tmp_path / "i", tmp_path / "q"), Bookkeeper(make_engine("sqlite://")),
                   tmp_path / "spool")


def test_echo_is_answered_and_the_association_limit_holds(front):
    echo = ["echoscu", "-aet", "STORESCU", "-aec", "TRIAGE", "127.0.0.1", str(front.front.port)]
    assert subprocess.run(echo, capture_output=True, env=DCMTK_ENV, timeout=30).returncode == 0
    front.front.settings.max_associations = 0  # "every association slot is taken"
    refused = subprocess.run(echo, capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stdout + refused.stderr
    assert front.front.deferred == 1


def test_concurrent_association_requests_never_exceed_the_limit(tmp_path):
    limited = Front(tmp_path / "r", max_associations=2, allowed_calling_aets=["PYSCU"])
    front = limited.start()
    requests = 4
    all_sent, all_answered = threading.Barrier(requests), threading.Barrier(requests)
    established: list[bool] = []

    def associate() -> None:
        ae = AE("PYSCU")
        ae.add_requested_context(Verification)
        all_sent.wait()  # every request on the wire at the same moment
        association = ae.associate("127.0.0.1", front.port, ae_title="TRIAGE")
        established.append(association.is_established)
        all_answered.wait()  # the accepted ones stay open until every request has its answer
        if association.is_established:
            association.release()

    try:
        threads = [threading.Thread(target=associate) for _ in range(requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(established) == [False, False, True, True]
        assert front.deferred == 2
        # The slots are free again once those associations ended.
        assert front.wait_idle()
        echo = ["echoscu", "-aet", "PYSCU", "-aec", "TRIAGE", "127.0.0.1", str(front.port)]
        assert subprocess.run(echo, capture_output=True, env=DCMTK_ENV, timeout=30).returncode == 0
    finally:
        limited.stop()


def _send_with_request_uid(port: int, path, request_sop_instance_uid: str) -> int:
    """C-STORE the dataset in ``path`` with a request whose Affected SOP Instance UID is the one given.

    pynetdicom takes the request's UIDs from the file meta when it sends a file as it is on disk, so a file meta
    that disagrees with the dataset makes the request disagree with it too.
    """
    import pydicom

    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = request_sop_instance_uid
    ds.preamble = bytes(128)
    ds.save_as(path, enforce_file_format=False)  # keep the disagreeing meta as it is
    ae = AE("PYSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)  # the file's: sent as it is on disk
    association = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert association.is_established
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        status = association.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        association.release()
    return status.Status


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_request_uid_that_differs_from_the_dataset_is_quarantined_and_a_hostile_one_stays_in_the_spool(front,
                                                                                                      tmp_path):
    other, hostile = write_mr_series(tmp_path / "send", n=2)
    assert _send_with_request_uid(front.front.port, other, "1.2.3.4.5.6") == 0x0000  # storescp's own answer
    assert _send_with_request_uid(front.front.port, hostile, "1.2.3/../../../../../escaped") == 0x0000
    assert storescu(front.front.port, write_mr_series(tmp_path / "good", n=1)[0]).returncode == 0
    assert front.front.wait_idle()

    sidecars = [json.loads(p.read_text()) for p in sorted((front.root / "quarantine").glob("*.json"))]
    assert sorted(s["reason"].split(" differs from ")[1] for s in sidecars) == [
        "the request's Affected SOP Instance UID 1.2.3.4.5.6",
        "the request's Affected SOP Instance UID 1.2.3/../../../../../escaped"]
    assert all(s["status"] == "0xA900" for s in sidecars)
    assert front.count() == 1 and front.front.rejected_by_status[0xA900] == 2
    # Nothing was written under a name made of the request's UID, in or out of the receiver's folders.
    assert not list(tmp_path.rglob("*escaped*")) and not (tmp_path.parent / "escaped").exists()
    assert [p.name for p in (front.root / "spool").iterdir()] == []


def test_files_left_in_the_spool_while_the_receiver_runs_are_taken_in_without_a_restart(front, tmp_path):
    """What a previous run's storescp wrote after this run's start-up scan is not left for the next restart."""
    folder = front.root / "spool" / "4242.0-9"
    folder.mkdir()
    (folder / ASSOCIATION_FILE).write_text(json.dumps(
        {"calling_aet": "MR1", "called_aet": "TRIAGE", "peer_address": "10.1.2.3"}))
    shutil.copy(write_mr_series(tmp_path / "send", n=1)[0], folder / "MR.X.1.2.3")
    wait_for(lambda: front.count() == 1, 15, what="the left file taken in by the spool rescan")
    wait_for(lambda: not folder.exists(), 5, what="the left folder removed")


def test_a_storescp_left_running_by_a_previous_run_is_killed_before_its_folder_is_taken_in(tmp_path):
    receiver = Front(tmp_path / "r")
    spool = (tmp_path / "r" / "spool").resolve()
    folder = spool / "4242.0-3"
    folder.mkdir(parents=True)
    # A previous run's storescp, still serving its folder (here listening on a port of its own), and an
    # unrelated process whose pid a second sidecar names: only the storescp is killed.
    leftover = subprocess.Popen(["storescp", "-od", str(folder), str(free_port())], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        wait_for(lambda: start_time(leftover.pid) is not None, 10, what="storescp started")
        (folder / ASSOCIATION_FILE).write_text(json.dumps(
            {"calling_aet": "MR1", "called_aet": "TRIAGE", "peer_address": "10.1.2.3",
             "pid": leftover.pid, "start_time": start_time(leftover.pid)}))
        shutil.copy(write_mr_series(tmp_path / "send", n=1)[0], folder / "MR.X.1.2.3")
        other = spool / "4242.0-4"
        other.mkdir()
        (other / ASSOCIATION_FILE).write_text(json.dumps(
            {"calling_aet": "MR1", "pid": bystander.pid, "start_time": start_time(bystander.pid)}))
        front = receiver.start()
        assert leftover.wait(5) == -signal.SIGKILL
        assert bystander.poll() is None
        assert front.wait_idle() and receiver.count() == 1 and not folder.exists()
    finally:
        receiver.stop()
        for process in (leftover, bystander):
            if process.poll() is None:
                process.kill()
            process.wait()


def _storescps_writing_under(folder) -> list[int]:
    """Running storescp processes whose command line names a path under ``folder`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if argv and os.path.basename(argv[0]) == b"storescp" and state != "Z" \
                and any(str(folder).encode() in arg for arg in argv):
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_serve_killed_mid_send_leaves_no_storescp_and_every_acknowledged_image_completes_once(
        tmp_path, postgres_url, redis_url):
    from tests.support.service import Service

    study_uid, series_uid = generate_uid(), generate_uid()
    (tmp_path / "study").mkdir()
    sop_uids = {}
    for index in range(400):  # 128 KB each: long enough a send to be killed in the middle of it
        ds = mr_slice(study_uid, series_uid, index, rows=256, columns=256)
        path = tmp_path / "study" / f"slice{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids[str(path)] = ds.SOPInstanceUID
    service = Service(tmp_path, postgres_url, redis_url, tmp_path / "no-bundle", scp={"engine": "dcmtk"},
                      assembly={"quiet_period_s": 2, "poll_interval_s": 0.5})
    spool = tmp_path / "var" / "spool"
    try:
        service.start_serve()
        sender = start_process(
            ["storescu", "-v", "-aet", "MODALITY", "-aec", "TRIAGE", "127.0.0.1", str(service.scp_port),
             *sop_uids], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV)
        acknowledged, sending = [], None
        for line in sender.stdout:  # type: ignore[union-attr]
            if line.startswith("I: Sending file: "):
                sending = line.removeprefix("I: Sending file: ").strip()
            elif line.startswith("I: Received Store Response (Success)"):
                acknowledged.append(sop_uids[sending])
                if len(acknowledged) == 60:
                    os.kill(service.processes["serve"].pid, signal.SIGKILL)  # the service only, as the OOM killer
        # storescp dies with the service: the sender is cut off, not answered Success by an orphan.
        assert sender.wait(30) != 0 and 60 <= len(acknowledged) < len(sop_uids), "storescp outlived the service"
        service.processes["serve"].wait(10)
        wait_for(lambda: not _storescps_writing_under(spool), 10, what="storescp gone with the killed service")

        service.start_serve()
        wait_for(lambda: len(service.runs()) == 1, 60, what="the study completed after the restart")
        time.sleep(6)  # several spool rescans and quiet periods: nothing comes late as a second version
        engine = make_engine(postgres_url)
        with engine.connect() as c:
            recorded = set(c.execute(select(instances.c.sop_instance_uid)).scalars())
            study = c.execute(select(studies.c.version, studies.c.instance_count)).one()
        engine.dispose()
        runs = service.runs()
    finally:
        service.stop()
    assert set(acknowledged) <= recorded
    assert len(recorded) <= len(acknowledged) + 1  # and perhaps the one storescp wrote whole as it was killed
    assert tuple(study) == (1, len(recorded))
    assert [(r.study_version, r.status) for r in runs] == [(1, "queued")]
    assert not _storescps_writing_under(spool)


@pytest.mark.parametrize("with_setpriv", [True, False], ids=["setpriv", "preexec_fn"])
def test_a_spawned_child_is_killed_when_the_thread_that_started_it_ends(with_setpriv):
    setpriv = shutil.which("setpriv") if with_setpriv else None  # without: the fallback, on purpose
    if with_setpriv and setpriv is None:
        pytest.skip("util-linux setpriv is not installed")
    spawner = Spawner("test spawner", setpriv=setpriv)
    spawner.start()
    child = spawner.spawn(["sleep", "60"])
    try:
        assert os.getpgid(child.pid) == child.pid  # a process group of its own
        # Running sleep itself: setpriv asks for the signal just before it execs (a service dying in that instant
        # leaves an orphan, which the next start kills).
        wait_for(lambda: command_line(child.pid)[:1] == ["sleep"], 5, interval=0.01, what="sleep started")
        spawner.stop()  # the spawning thread ends, as it does when the service dies
        assert child.wait(5) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
