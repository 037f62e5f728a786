"""Nothing acknowledged is lost: values that do not fit the schema, rows the database refuses, duplicate UIDs,
a receiver killed mid-association, and a restart while the database is down.

The bookkeeping tests run on SQLite and PostgreSQL (SQLite does not enforce column widths, which hid that one
legacy date stopped all bookkeeping); the process tests run `triage serve` on PostgreSQL.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs_bridge.bookkeeping import Bookkeeper, EventRecord, ReceivedInstance
from pacs_bridge.intake import STATUS_DATASET_MISMATCH, InstanceHeader, RejectedInstance, check_received
from pacs_bridge.reconcile import StoreReconciler
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from sql.schema import events, instances, processing_runs, series, studies
from tests.support.dicom_factory import mr_slice
from tests.support.processes import start_process, wait_for
from tests.support.service import DCMTK_ENV, Service

pytestmark = pytest.mark.needs_dcmtk

MR = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def intake(bookkeeping_url, tmp_path):
    """An engine, a store and a running bookkeeper that quarantines what it sets aside."""
    engine = make_engine(bookkeeping_url)
    store = InstanceStore(tmp_path / "incoming", tmp_path / "quarantine")
    bookkeeper = Bookkeeper(engine, flush_interval_s=0.05, quarantine_file=store.quarantine_file)
    bookkeeper.start()
    yield engine, store, bookkeeper
    bookkeeper.stop()
    engine.dispose()


def _file_bytes(ds: Dataset, tmp_path: Path) -> bytes:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _unfitting_objects(study_uid: str) -> list[Dataset]:
    """One object per kind of value that does not fit the schema as sent (each was seen from a real sender)."""
    series_uid = generate_uid()
    variants = []
    for index, change in enumerate([
        {"StudyDate": "1995.01.12"},                      # ACR-NEMA date in a varchar(8)
        {"Modality": "MAGNETICRESONANCE"},                # 17 characters in a varchar(16)
        {"PatientSex": "FEMALE-IDENTIFYING"},             # 18 characters
        {"StudyDescription": "MRI\x00BRAIN"},             # a NUL inside a description
        {"SeriesDescription": "AX FLAIR " * 20},          # longer than the column, cut at a word
        {"SeriesNumber": "123456789012"},                 # an IS beyond an INTEGER column
        {"AccessionNumber": "A" * 80},
        {"PatientAge": "054Y\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"},
    ]):
        ds = mr_slice(study_uid, series_uid, index)
        for keyword, value in change.items():
            if keyword in ("StudyDate", "Modality", "PatientSex", "PatientAge", "SeriesNumber", "AccessionNumber"):
                # Written as raw bytes with the element's VR: pydicom would refuse to set most of them.
                ds[keyword].value = value
            else:
                setattr(ds, keyword, value)
        variants.append(ds)
    return variants


def test_check_received_fits_every_value_to_the_schema_and_names_what_changed(tmp_path):
    study = generate_uid()
    headers = [check_received(_file_bytes(ds, tmp_path)) for ds in _unfitting_objects(study)]
    date, modality, sex, description, series_description, series_number, accession, age = headers
    assert date.study_attributes["StudyDate"] == "19950112"
    assert date.normalised["StudyDate"] == {"received": "1995.01.12", "stored": "19950112"}
    assert len(modality.modality) <= 16 and "Modality" in modality.normalised
    assert len(sex.study_attributes["PatientSex"]) <= 16
    assert description.study_attributes["StudyDescription"] == "MRIBRAIN"
    assert len(series_description.series_description) <= 128
    assert not series_description.series_description.endswith(" AX F")  # never cut mid-word
    assert series_description.series_description.endswith("FLAIR")
    assert series_number.series_number is None and "SeriesNumber" in series_number.normalised
    assert len(accession.study_attributes["AccessionNumber"]) == 64
    assert age.study_attributes["PatientAge"] == "054Y" and age.normalised is None  # trailing padding is legal


def test_an_image_object_without_pixel_data_is_refused_at_intake(tmp_path):
    ds = mr_slice(generate_uid(), generate_uid(), 0)
    del ds.PixelData
    with pytest.raises(RejectedInstance) as refused:
        check_received(_file_bytes(ds, tmp_path))
    assert refused.value.status == STATUS_DATASET_MISMATCH
    assert "no pixel data" in refused.value.reason


def _item(study: str, series_uid: str, sop: str, store: InstanceStore, **header_values) -> ReceivedInstance:
    """A received instance whose header was NOT fitted (as a caller that bypassed intake would make it)."""
    values = {"study_instance_uid": study, "series_instance_uid": series_uid, "sop_instance_uid": sop,
              "sop_class_uid": MR, "transfer_syntax_uid": "1.2.840.10008.1.2.1", "modality": "MR",
              "series_description": "AX FLAIR", "series_number": 1, "manufacturer": "",
              "study_attributes": {"PatientSex": "F"}}
    values.update(header_values)
    data = f"{study}/{series_uid}/{sop}".encode()
    stored = store.store(study, series_uid, sop, data)
    return ReceivedInstance(header=InstanceHeader(**values), stored=stored, calling_aet="MODALITY")


def _counts(engine) -> tuple[int, int]:
    with engine.connect() as c:
        return (c.execute(select(func.count()).select_from(instances)).scalar_one(),
                c.execute(select(func.sum(studies.c.instance_count))).scalar_one() or 0)


def test_a_row_the_database_refuses_is_set_aside_and_the_rest_of_the_batch_is_written(
        intake, bookkeeping_url, tmp_path):
    engine, store, bookkeeper = intake
    study, series_uid = generate_uid(), generate_uid()
    good = [_item(study, series_uid, generate_uid(), store) for _ in range(6)]
    # Rows no intake should produce any more; the writer must survive them anyway. SQLite takes the first two
    # (no width limits), PostgreSQL refuses all three.
    bad_study = generate_uid()
    poisoned = [
        _item(bad_study, generate_uid(), generate_uid(), store, study_attributes={"StudyDate": "1995.01.12"}),
        _item(bad_study, generate_uid(), generate_uid(), store, modality="M" * 17),
        _item(bad_study, generate_uid(), generate_uid(), store, series_description="A\x00B"),
    ]
    for item in good[:3] + poisoned + good[3:]:
        bookkeeper.add(item)
    bookkeeper.add(EventRecord(kind="quarantine\x00", reason="reason with a NUL \x00",
                               sop_instance_uid="1.2\x00" + "9" * 200, detail={"x": "a\x00b"}))
    assert bookkeeper.wait_idle(30)
    after_valid = [_item(generate_uid(), generate_uid(), generate_uid(), store) for _ in range(3)]
    for item in after_valid:
        bookkeeper.add(item)
    assert bookkeeper.wait_idle(30), "the writer stalled"
    assert bookkeeper.stall_s == 0.0
    recorded, counted = _counts(engine)
    with engine.connect() as c:
        recorded_sops = set(c.execute(select(instances.c.sop_instance_uid)).scalars())
        quarantine_events = c.execute(select(events.c.reason, events.c.sop_instance_uid)
                                      .where(events.c.kind == "quarantine")).all()
    assert {item.header.sop_instance_uid for item in good + after_valid} <= recorded_sops
    refused = [item for item in poisoned if item.header.sop_instance_uid not in recorded_sops]
    if bookkeeping_url.startswith("postgresql"):
        assert len(refused) == 3
    assert recorded == counted  # counts stay true
    for item in refused:  # set aside: the file is in quarantine with its reason, and an event says so
        assert not item.stored.path.exists()
        assert any(sop == item.header.sop_instance_uid and "database refused" in reason
                   for reason, sop in quarantine_events)
    assert len(list((tmp_path / "quarantine").glob("*.json"))) == len(refused)
    assert any("reason with a NUL" in reason for reason, _ in quarantine_events)


def test_the_same_sop_instance_uid_in_another_study_is_set_aside_and_counts_stay_true(intake, bookkeeping_url, tmp_path):
    engine, store, bookkeeper = intake
    shared_sop = generate_uid()
    first_study, second_study = generate_uid(), generate_uid()
    first = _item(first_study, generate_uid(), shared_sop, store)
    bookkeeper.add(first)
    assert bookkeeper.wait_idle(30)
    second = _item(second_study, generate_uid(), shared_sop, store)
    other = _item(second_study, second.header.series_instance_uid, generate_uid(), store)
    bookkeeper.add(second)
    bookkeeper.add(other)
    assert bookkeeper.wait_idle(30)
    with engine.connect() as c:
        row = c.execute(select(instances.c.path).where(instances.c.sop_instance_uid == shared_sop)).one()
        per_study = dict(c.execute(select(studies.c.study_instance_uid, studies.c.instance_count)).all())
        reasons = c.execute(select(events.c.reason).where(events.c.kind == "quarantine")).scalars().all()
    assert row.path == str(first.stored.path) and first.stored.path.exists()  # the first copy is kept
    assert per_study == {first_study: 1, second_study: 1}
    assert not second.stored.path.exists()
    assert any(shared_sop in reason and first_study in reason for reason in reasons)


def test_the_writer_pushes_back_within_seconds_when_the_database_is_gone_and_stops_promptly(tmp_path):
    proxy = TcpProxy(5432).start()
    engine = make_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{proxy.port}/test")
    bookkeeper = Bookkeeper(engine, flush_interval_s=0.05)
    bookkeeper.start()
    try:
        proxy.cut()
        bookkeeper.add(EventRecord(kind="test", reason="written while the database is away"))
        wait_for(lambda: bookkeeper.stall_s > 2, 15, what="the stall to be seen")
        assert bookkeeper.last_error
    finally:
        started = time.monotonic()
        bookkeeper.stop(timeout=2)
        stopped_in = time.monotonic() - started
        proxy.close()
        engine.dispose()
    assert stopped_in < 5, "stopping must not spin for ever on a database that is gone"


def test_reconciliation_records_stored_files_that_have_no_row(intake, tmp_path):
    engine, store, bookkeeper = intake
    study, series_uid = generate_uid(), generate_uid()
    sender = {"calling_aet": "MODALITY", "called_aet": "TRIAGE", "peer_address": "10.1.2.3", "source": "c-store"}
    for index in range(5):  # stored and acknowledged, then the process died before any row was written
        ds = mr_slice(study, series_uid, index)
        store.store(study, series_uid, ds.SOPInstanceUID, _file_bytes(ds, tmp_path), sender=sender)
    junk = store.path_for(study, series_uid, generate_uid())
    junk.write_bytes(b"not dicom at all")
    reconciler = StoreReconciler(engine, store, bookkeeper)
    report = reconciler.run(full=True)
    assert study in reconciler.active.current()  # held active until its rows are written
    assert bookkeeper.wait_idle(30)
    assert study not in reconciler.active.current()
    assert (report.recorded, report.quarantined) == (5, 1)
    with engine.connect() as c:
        series_row = c.execute(select(series).where(series.c.series_instance_uid == series_uid)).one()
        count = c.execute(select(studies.c.instance_count)
                          .where(studies.c.study_instance_uid == study)).scalar_one()
    assert count == 5
    assert (series_row.calling_aet, series_row.called_aet, series_row.peer_address) == \
        ("MODALITY", "TRIAGE", "10.1.2.3")
    assert reconciler.run(full=True).recorded == 0  # a second pass finds nothing more
    assert not junk.exists()


class TcpProxy:
    """A TCP forwarder to a local port that can be cut: the database 'goes away' without stopping the server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self._open.clear()
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()
            self._connections.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.cut()
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass


# -- real processes ---------------------------------------------------------------------------------------------

def _stored_files(service: Service) -> set[str]:
    root = service.workdir / "var" / "incoming"
    return {str(path) for path in root.rglob("*.dcm") if not path.name.startswith(".")}


def _recorded_paths(database_url: str) -> set[str]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as c:
            return set(c.execute(select(instances.c.path)).scalars())
    finally:
        engine.dispose()


def _study_state(database_url: str, study_uid: str):
    engine = make_engine(database_url)
    try:
        with engine.connect() as c:
            study = c.execute(select(studies).where(studies.c.study_instance_uid == study_uid)).first()
            runs = c.execute(select(processing_runs).where(processing_runs.c.study_id == study.id)).all() \
                if study is not None else []
        return study, runs
    finally:
        engine.dispose()


def _status(database_url: str, study_uid: str) -> str | None:
    study, _ = _study_state(database_url, study_uid)
    return study.status if study is not None else None


def _write_study(folder: Path, n: int, study_uid: str | None = None) -> str:
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        mr_slice(study_uid, series_uid, index, rows=128, columns=128).save_as(folder / f"{index:04d}.dcm",
                                                                            enforce_file_format=True)
    return study_uid


def _acknowledged(storescu_output: str) -> int:
    return len(re.findall(r"Received Store Response \(Success\)", storescu_output))


@pytest.mark.slow
def test_unfitting_values_then_a_valid_study_on_postgresql_through_triage_serve(tmp_path, postgres_url):
    service = Service(tmp_path, postgres_url, "", tmp_path / "no-bundle")
    try:
        service.start_serve()
        bad = tmp_path / "bad"
        bad.mkdir()
        bad_study = generate_uid()
        for ds in _unfitting_objects(bad_study):
            ds.save_as(bad / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        sent = service.send(bad)
        assert sent.returncode == 0, sent.stderr
        good_study = _write_study(tmp_path / "good", 12)
        sent = service.send(tmp_path / "good")
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: _status(postgres_url, good_study) not in (None, "receiving"), 60,
                 what="the valid study to complete")
        study, _ = _study_state(postgres_url, good_study)
        assert study.instance_count == 12
        bad_row, _ = _study_state(postgres_url, bad_study)
        assert bad_row.instance_count == 8
        assert _stored_files(service) <= _recorded_paths(postgres_url)
        engine = make_engine(postgres_url)
        with engine.connect() as c:
            normalised = c.execute(select(events).where(events.c.kind == "normalised")).all()
        engine.dispose()
        assert len(normalised) >= 6
        assert any(row.detail["changes"].get("StudyDate") == {"received": "1995.01.12", "stored": "19950112"}
                   for row in normalised)
    finally:
        service.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 40])
def test_sigkill_mid_association_loses_no_acknowledged_image(tmp_path, postgres_url, kill_after):
    service = Service(tmp_path, postgres_url, "", tmp_path / "no-bundle",
                      assembly={"quiet_period_s": 2, "poll_interval_s": 0.5})
    folder = tmp_path / "study"
    study_uid = _write_study(folder, 150)
    try:
        service.start_serve()
        sender = start_process(
            ["storescu", "-v", "-aet", "MODALITY", "-aec", "TRIAGE", "+sd", "127.0.0.1", str(service.scp_port),
             str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV)
        wait_for(lambda: len(_stored_files(service)) >= kill_after, 60, interval=0.01, what="images to arrive")
        os.killpg(service.processes["serve"].pid, signal.SIGKILL)
        service.processes["serve"].wait(10)
        output, _ = sender.communicate(timeout=60)
        acknowledged = _acknowledged(output)
        stored = _stored_files(service)
        assert acknowledged <= len(stored)

        service.start_serve()
        wait_for(lambda: stored <= _recorded_paths(postgres_url), 60, what="every stored image to be recorded")
        wait_for(lambda: _study_state(postgres_url, study_uid)[1], 60, what="the study to be dispatched")
        time.sleep(3)  # a second version would be dispatched within a quiet period
        study, runs = _study_state(postgres_url, study_uid)
        assert len(runs) == 1 and runs[0].study_version == 1 and study.version == 1
        assert study.instance_count == len(stored) >= acknowledged
    finally:
        service.stop()


@pytest.mark.slow
def test_a_restart_during_a_database_outage_records_everything_acknowledged(tmp_path, postgres_url):
    proxy = TcpProxy(5432).start()
    proxied_url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    service = Service(tmp_path, proxied_url, "", tmp_path / "no-bundle",
                      scp={"max_write_stall_s": 3})
    folder = tmp_path / "study"
    study_uid = _write_study(folder, 20)
    try:
        service.start_serve()
        proxy.cut()
        sent = subprocess.run(
            ["storescu", "-v", "-aet", "MODALITY", "-aec", "TRIAGE", "+sd", "127.0.0.1", str(service.scp_port),
             str(folder)], capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
        acknowledged = _acknowledged(sent.stdout + sent.stderr)
        stored = _stored_files(service)
        assert acknowledged == len(stored)
        # Restart while the database is still away: the receiver waits for it rather than exiting.
        os.killpg(service.processes["serve"].pid, signal.SIGTERM)
        service.processes["serve"].wait(30)
        service._start("serve", ["serve"])
        time.sleep(2)
        assert service.processes["serve"].poll() is None, service.log("serve")
        proxy.restore()
        wait_for(lambda: b"listening" in (tmp_path / "serve.log").read_bytes().split(b"retrying")[-1], 60,
                 what="the receiver to come back with the database")
        wait_for(lambda: stored <= _recorded_paths(postgres_url), 60, what="every acknowledged image recorded")
        if acknowledged:
            wait_for(lambda: _study_state(postgres_url, study_uid)[1], 60, what="the study to be dispatched")
            study, runs = _study_state(postgres_url, study_uid)
            assert study.instance_count == acknowledged and len(runs) == 1
    finally:
        service.stop()
        proxy.close()


@pytest.mark.slow
def test_every_file_pydicom_and_pydicom_data_ship_is_recorded_refused_or_quarantined(tmp_path, postgres_url):
    from pydicom.data import get_testdata_files

    service = Service(tmp_path, postgres_url, "", tmp_path / "no-bundle",
                      scp={"allowed_calling_aets": ["MODALITY"], "max_object_bytes": 0})
    files = sorted(set(get_testdata_files()))
    try:
        service.start_serve()
        outcomes: dict[str, int] = {"success": 0, "failure": 0, "refused": 0}
        for path in files:
            # One association per file: storescu proposes only this file's SOP class and transfer syntax.
            run = subprocess.run(["storescu", "-v", "-aet", "MODALITY", "-aec", "TRIAGE", "127.0.0.1",
                                  str(service.scp_port), path], capture_output=True, text=True, env=DCMTK_ENV,
                                 timeout=60)
            output = run.stdout + run.stderr
            if "Received Store Response (Success" in output or "Received Store Response (Warning" in output:
                outcomes["success"] += 1
            elif "Received Store Response" in output:
                outcomes["failure"] += 1
            else:  # not DICOM to storescu, or no presentation context for its class: refused before any store
                assert run.returncode != 0 or "No presentation context" in output or "not" in output.lower(), output
                outcomes["refused"] += 1
        assert service.processes["serve"].poll() is None, service.log("serve")
        assert outcomes["success"] > 50
        stored = _stored_files(service)
        wait_for(lambda: stored <= _recorded_paths(postgres_url), 60, what="every stored file to be recorded")
        reasons = [path.read_text() for path in (tmp_path / "var" / "quarantine").glob("*.json")]
        assert len(reasons) >= outcomes["failure"]
        assert all('"reason"' in text for text in reasons)
        # The writer is still writing: a valid study afterwards is recorded whole.
        study_uid = _write_study(tmp_path / "after", 5)
        assert service.send(tmp_path / "after").returncode == 0
        wait_for(lambda: getattr(_study_state(postgres_url, study_uid)[0], "instance_count", 0) == 5, 30,
                 what="the study after them to be recorded")
    finally:
        service.stop()


def test_a_scheduled_reconciliation_pass_records_and_waits_for_its_rows(postgres_url, tmp_path):
    from pacs_bridge.reconcile import reconcile_store

    upgrade(postgres_url)
    store = InstanceStore(tmp_path / "incoming", tmp_path / "quarantine")
    study, series_uid = generate_uid(), generate_uid()
    for index in range(3):
        ds = mr_slice(study, series_uid, index)
        path = store.store(study, series_uid, ds.SOPInstanceUID, _file_bytes(ds, tmp_path)).path
        os.utime(path, (time.time() - 600, time.time() - 600))  # older than the grace period
    engine = make_engine(postgres_url)
    try:
        report = reconcile_store(engine, tmp_path / "incoming", tmp_path / "quarantine")
        assert report.recorded == 3
        with engine.connect() as c:
            assert c.execute(select(func.count()).select_from(instances)).scalar_one() == 3
    finally:
        engine.dispose()


def test_two_writers_creating_the_same_study_at_once_lose_nothing_to_quarantine(postgres_url, tmp_path):
    """The API's STOW-RS bookkeeper and the receiver's can insert the same new study at the same moment: the loser
    of that race gets a unique-key violation, which is a race to retry, not a bad row to set aside."""
    from pacs_bridge.bookkeeping import write_batch

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    store = InstanceStore(tmp_path / "incoming", tmp_path / "quarantine")
    bookkeeper = Bookkeeper(engine, flush_interval_s=0.05, quarantine_file=store.quarantine_file)
    study, series_uid = generate_uid(), generate_uid()
    try:
        with engine.connect() as other_writer:
            transaction = other_writer.begin()
            write_batch(other_writer, [_item(study, series_uid, generate_uid(), store)])  # holds the new study's key
            bookkeeper.start()
            ours = _item(study, series_uid, generate_uid(), store)
            bookkeeper.add(ours)
            time.sleep(1.0)  # our insert now waits on the other writer's uncommitted row
            transaction.commit()
        assert bookkeeper.wait_idle(30)
        with engine.connect() as c:
            count = c.execute(select(studies.c.instance_count).where(studies.c.study_instance_uid == study)).scalar_one()
        assert count == 2 and ours.stored.path.exists()
        assert bookkeeper.set_aside == 0 and not list((tmp_path / "quarantine").iterdir())
    finally:
        bookkeeper.stop()
        engine.dispose()
