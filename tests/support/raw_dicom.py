"""Raw DICOM for the receiver's security tests: a C-STORE client that writes PDUs byte by byte, storescu, and
a receiver factory."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from sqlalchemy import func, select

from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.scp import ScpSettings, StorageSCP
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from sql.schema import instances
from tests.support.dicom_factory import write_mr_series
from tests.support.processes import free_port

STORESCU = shutil.which("storescu")


DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def make_receiver(tmp_path):
    started = []

    def make(**settings) -> tuple[StorageSCP, object, Path]:
        root = tmp_path / f"receiver{len(started)}"
        root.mkdir()
        url = f"sqlite:///{root / 'triage.db'}"
        upgrade(url)
        engine = make_engine(url)
        bookkeeper = Bookkeeper(engine, flush_interval_s=0.05)
        settings.setdefault("allowed_calling_aets", ["STORESCU", "PYSCU"])
        scp = StorageSCP(ScpSettings(port=free_port(), **settings),
                         InstanceStore(root / "incoming", root / "quarantine"), bookkeeper)
        bookkeeper.start()
        scp.start()
        started.append((scp, bookkeeper, engine))
        return scp, engine, root

    yield make
    for scp, bookkeeper, engine in started:
        scp.stop()
        bookkeeper.stop()
        engine.dispose()


def _storescu(port: int, *files, aet: str = "STORESCU") -> subprocess.CompletedProcess:
    if STORESCU is None:
        pytest.skip("dcmtk is not installed (run ops/setup.sh)")
    return subprocess.run([STORESCU, "-aet", aet, "-aec", "TRIAGE", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=60)


class RawStoreSCU:
    """A pynetdicom association that sends dataset bytes exactly as given, however broken they are."""

    def __init__(self, port: int, abstract_syntax: str = MRImageStorage,
                 transfer_syntax: str = ExplicitVRLittleEndian, aet: str = "PYSCU") -> None:
        ae = AE(ae_title=aet)
        ae.add_requested_context(abstract_syntax, transfer_syntax)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        assert self.assoc.is_established
        self.context = self.assoc.accepted_contexts[0]

    def send(self, dataset_bytes: bytes, sop_instance_uid: str | None = None,
             sop_class_uid: str = MRImageStorage) -> int:
        request = C_STORE()
        request.MessageID = 1
        request.Priority = 2
        request.AffectedSOPClassUID = sop_class_uid
        request.AffectedSOPInstanceUID = sop_instance_uid or generate_uid()
        request.DataSet = io.BytesIO(dataset_bytes)
        # What Association.send_c_store does once it has encoded a dataset (pause the reactor, send, wait).
        self.assoc._reactor_checkpoint.clear()
        while not self.assoc._is_paused:
            time.sleep(0.0001)
        self.assoc.dimse.send_msg(request, self.context.context_id)
        _, response = self.assoc.dimse.get_msg(block=True)
        self.assoc._reactor_checkpoint.set()
        assert response is not None, "the receiver did not answer"
        return response.Status

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def _encode(ds: pydicom.Dataset, implicit: bool = False) -> bytes:
    """The dataset alone (no preamble, no file meta), as it travels in a C-STORE."""
    ds = pydicom.Dataset(ds)  # a plain dataset: no preamble, no file meta
    ds.file_meta = FileMetaDataset()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=implicit, little_endian=True)
    return buffer.getvalue()


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
