"""A real Orthanc (Debian package) with the DICOMweb plugin, on free loopback ports.

`orthanc` is one Orthanc for the whole session, emptied before each test that asks for it (through its REST
API: deleting every patient deletes their instances). Tests that need an Orthanc of their own (other AE
titles, known modalities, one that is down and comes up later) construct `Orthanc` and stop it in a `finally`;
whatever they forget is stopped at session end by the process reaper (tests.support.processes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import free_port, start_process, stop_process, wait_for


class Orthanc:
    """A real Orthanc (Debian package) with the DICOMweb plugin, on free loopback ports."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC", modalities: dict[str, tuple[str, str, int]] | None = None
                 ) -> None:
        self.workdir = workdir
        self.aet = aet
        #: DICOM nodes Orthanc knows (name -> (AE title, host, port)): C-MOVE destinations, C-FIND/C-GET callers.
        self.modalities = dict(modalities or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(binary).exists():
            pytest.skip("Orthanc is not installed (run ops/setup.sh)")
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "triage-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False, "StableAge": 1, "HttpServerEnabled": True,
            "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{self.http_port}"},
            "DicomModalities": {name: list(node) for name, node in self.modalities.items()},
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config))
        with (self.workdir / "orthanc.log").open("wb") as log:
            env = {**os.environ, "TCP_NODELAY": "1"}
            self.process = start_process([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                         env=env)
        try:
            wait_for(self._alive, 60, what="Orthanc to answer")
        except BaseException:
            self.stop()
            raise
        return self

    def _alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            body = response.read()
            return json.loads(body) if response.headers.get_content_type() == "application/json" else body

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def delete(self, path: str) -> None:
        with urllib.request.urlopen(urllib.request.Request(self.url + path, method="DELETE"), timeout=30):
            pass

    def find_instances(self, **query: str) -> list[str]:
        return self.post("/tools/find", {"Level": "Instance", "Query": query})

    def empty(self) -> None:
        """Delete everything stored (a patient's deletion takes its studies, series and instances along)."""
        for patient in self.get("/patients"):
            self.delete(f"/patients/{patient}")

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory) -> Iterator[Orthanc]:
    """The session's shared Orthanc; tests ask for `orthanc`, which empties it first."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture
def orthanc(orthanc_server: Orthanc) -> Orthanc:
    """The shared Orthanc, empty, running (a test that stopped it gets a new one)."""
    if orthanc_server.process is None or orthanc_server.process.poll() is not None:
        orthanc_server.process = None
        orthanc_server.start()
    orthanc_server.empty()
    return orthanc_server
