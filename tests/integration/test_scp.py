"""The receiver with real peers: dcmtk's storescu/echoscu and pynetdicom as senders, a real SQLite database."""
from __future__ import annotations

import json
import shutil
import subprocess
from datetime import timedelta

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from pacs_bridge.assembly import CompletionPolicy, StudyAssembler
from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.scp import ScpSettings, StorageSCP
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from sql.schema import events, instances, processing_runs, studies, utcnow
from tests.support.dicom_factory import mr_slice, write_mr_series
from tests.support.processes import free_port
from tests.support.raw_dicom import DCMTK_ENV, _storescu

pytestmark = pytest.mark.needs_dcmtk


@pytest.fixture
def receiver(tmp_path):
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    upgrade(url)
    engine = make_engine(url)
    store = InstanceStore(tmp_path / "incoming", tmp_path / "quarantine")
    bookkeeper = Bookkeeper(engine, flush_interval_s=0.05)
    scp = StorageSCP(ScpSettings(port=free_port(), allowed_calling_aets=["STORESCU", "PYSCU"]), store, bookkeeper)
    bookkeeper.start()
    scp.start()
    yield scp, engine, tmp_path
    scp.stop()
    bookkeeper.stop()
    engine.dispose()


def _send_raw_file(port: int, path) -> int:
    """Send a file's dataset bytes as stored, unparsed (pynetdicom's chunked send reads only the file meta)."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(path).Status
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = False


def _quarantined(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "quarantine").glob("*.json"))]


def test_storescu_study_is_stored_as_received_and_recorded(receiver, tmp_path):
    scp, engine, root = receiver
    files = write_mr_series(tmp_path / "send", n=5)
    result = _storescu(scp.port, *files)
    assert result.returncode == 0, result.stderr
    assert scp.bookkeeper.wait_idle()
    with engine.connect() as c:
        stored = c.execute(select(instances.c.path, instances.c.size_bytes)).all()
        study = c.execute(select(studies)).one()
    assert len(stored) == 5 and study.instance_count == 5 and study.status == "receiving"
    assert study.accession_number == "ACC1" and study.patient_sex == "F"
    # Stored byte for byte as the file was sent (storescu sends the file's own transfer syntax).
    sent = {f.read_bytes()[128:] for f in files}
    kept = {open(p, "rb").read()[128:] for p, _ in stored}
    assert len(kept) == 5
    for data in kept:
        # the meta group is rewritten by the receiver (implementation UID); the dataset bytes are identical
        assert any(data.endswith(original[original.index(b"\x08\x00\x16\x00"):]) for original in sent)


def test_echo_answers(receiver):
    scp, _, _ = receiver
    if shutil.which("echoscu") is None:
        pytest.skip("dcmtk is not installed")
    result = subprocess.run(["echoscu", "-aet", "STORESCU", "-aec", "TRIAGE", "127.0.0.1", str(scp.port)],
                            capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    assert result.returncode == 0, result.stderr


def test_same_study_sent_twice_gives_one_version_and_one_run(receiver, tmp_path):
    scp, engine, _ = receiver
    files = write_mr_series(tmp_path / "send", n=3)
    assert _storescu(scp.port, *files).returncode == 0
    assert scp.bookkeeper.wait_idle()
    dispatched: list[tuple[int, str]] = []
    assembler = StudyAssembler(engine, lambda run, pipeline: dispatched.append((run, pipeline)),
                               CompletionPolicy(quiet_period_s=0, max_wait_s=600), active_studies=scp.active.current)
    later = utcnow() + timedelta(seconds=1)
    assembler.check_once(later)
    assert _storescu(scp.port, *files).returncode == 0  # the PACS sends it again
    assert scp.bookkeeper.wait_idle()
    assembler.check_once(later + timedelta(seconds=5))
    with engine.connect() as c:
        study = c.execute(select(studies)).one()
        runs = c.execute(select(func.count()).select_from(processing_runs)).scalar_one()
    assert (study.version, study.instance_count, study.status) == (1, 3, "queued")
    assert runs == 1 and dispatched == [(1, "neuro_mri")]


def test_late_image_reopens_the_study_as_a_new_version(receiver, tmp_path):
    scp, engine, _ = receiver
    files = write_mr_series(tmp_path / "send", n=3)
    assert _storescu(scp.port, *files).returncode == 0
    assert scp.bookkeeper.wait_idle()
    dispatched = []
    assembler = StudyAssembler(engine, lambda run, pipeline: dispatched.append(run),
                               CompletionPolicy(quiet_period_s=0, max_wait_s=600), active_studies=scp.active.current)
    assembler.check_once(utcnow() + timedelta(seconds=1))
    import pydicom

    first = pydicom.dcmread(files[0])
    late = tmp_path / "late.dcm"
    mr_slice(first.StudyInstanceUID, first.SeriesInstanceUID, 7).save_as(late, enforce_file_format=True)
    assert _storescu(scp.port, late).returncode == 0
    assert scp.bookkeeper.wait_idle()
    assembler.check_once(utcnow() + timedelta(seconds=5))
    with engine.connect() as c:
        study = c.execute(select(studies)).one()
        versions = c.execute(select(processing_runs.c.study_version).order_by(processing_runs.c.id)).scalars().all()
    assert study.version == 2 and study.instance_count == 4
    assert versions == [1, 2] and len(dispatched) == 2


def test_bad_inputs_are_refused_quarantined_and_the_scp_keeps_serving(receiver, tmp_path):
    scp, engine, root = receiver
    good = write_mr_series(tmp_path / "good", n=1)[0]
    raw = good.read_bytes()
    meta_end = raw.index(b"\x08\x00")  # first element after the file meta group (group 0008)

    not_dicom = tmp_path / "not_dicom.dcm"  # a valid meta header, then bytes that are not a dataset
    not_dicom.write_bytes(raw[:meta_end] + b"this is a text file, not a DICOM dataset\n" * 20)
    truncated = tmp_path / "truncated.dcm"  # pixel data cut short in transit
    truncated.write_bytes(raw[: len(raw) - 700])
    hostile = tmp_path / "hostile.dcm"
    ds = mr_slice(generate_uid(), generate_uid(), 0)
    ds.SOPInstanceUID = "1.2.3/../../../../escaped"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(hostile, enforce_file_format=True)

    statuses = {name: _send_raw_file(scp.port, path)
                for name, path in [("not_dicom", not_dicom), ("truncated", truncated), ("hostile", hostile)]}
    assert all(status >= 0xA000 for status in statuses.values()), statuses

    assert _storescu(scp.port, good).returncode == 0  # still serving
    assert scp.bookkeeper.wait_idle()

    reasons = [q["reason"] for q in _quarantined(root)]
    assert len(reasons) == 3
    assert any("not a DICOM dataset" in r or "malformed" in r for r in reasons)
    assert any("truncated" in r for r in reasons)
    assert any("SOPInstanceUID" in r and "not a valid DICOM UID" in r for r in reasons)
    for kept in (root / "quarantine").glob("*.dcm"):
        assert kept.stat().st_size > 0
    # Nothing was written outside the store.
    assert not any("escaped" in p.name for p in root.rglob("*") if "quarantine" not in p.parts)
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(instances)).scalar_one() == 1
        kinds = c.execute(select(events.c.kind)).scalars().all()
    assert kinds.count("quarantine") == 3


def test_unknown_calling_ae_title_is_refused(receiver, tmp_path):
    scp, engine, _ = receiver
    files = write_mr_series(tmp_path / "send", n=1)
    result = _storescu(scp.port, *files, aet="INTRUDER")
    assert result.returncode != 0
    assert scp.bookkeeper.wait_idle()
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(instances)).scalar_one() == 0


def test_full_disk_or_database_backlog_defers_stores_and_loses_nothing(receiver, tmp_path):
    scp, engine, root = receiver
    files = write_mr_series(tmp_path / "send", n=2)
    scp.settings.min_free_bytes = 1 << 62  # "the disk is full"
    result = _storescu(scp.port, *files)
    assert result.returncode != 0 or "0xa700" in (result.stdout + result.stderr).lower()
    assert scp.deferred >= 1 and not list((root / "quarantine").glob("*.dcm"))  # refused, not swallowed
    deferred = scp.deferred
    scp.settings.min_free_bytes = 0
    scp.settings.max_backlog = -1  # "the database is far behind"
    _storescu(scp.port, *files)
    assert scp.deferred > deferred
    assert not list((root / "incoming").rglob("*.dcm"))
    scp.settings.max_backlog = 20000  # recovered: the sender's retry is stored
    assert _storescu(scp.port, *files).returncode == 0
    assert scp.bookkeeper.wait_idle()
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(instances)).scalar_one() == 2


def test_a_closed_associations_study_stays_active_until_its_last_rows_are_written():
    from pacs_bridge.scp import ActiveStudies

    added, written = [5], [3]  # the association's last image was the 5th item; only 3 are in the database
    active = ActiveStudies(written=lambda: written[0], added=lambda: added[0])
    active.add(1, "1.2.3")
    active.close(1)
    assert active.current() == {"1.2.3"}  # not quiet yet: completing now would split the study in two versions
    written[0] = 5
    assert active.current() == set()
