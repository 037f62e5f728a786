"""Raw DICOM for the receiver's security tests: a C-STORE client that writes PDUs byte by byte, storescu, and a
receiver factory."""
from __future__ import annotations

import io
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

from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.schema import make_engine
from pacs_bridge.scp import ScpSettings, StorageSCP
from pacs_bridge.storage import InstanceStore
from tests.support.processes import free_port
from worker.database import upgrade

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
