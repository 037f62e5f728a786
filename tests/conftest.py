"""Shared fixtures: real Postgres, Redis and Orthanc on loopback, started or created per test session."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.stress import cpu_stress_fixture as cpu_stress  # noqa: F401  (a fixture for every test module)

POSTGRES_ADMIN_URL = os.environ.get("TRIAGE_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TRIAGE_TEST_REDIS", "redis://127.0.0.1:6379")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"triage_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # pragma: no cover - reported clearly rather than as a confusing failure
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not usable: {exc}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as c:
        c.exec_driver_sql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def bookkeeping_url(request, tmp_path):
    """A migrated database, once on SQLite and once on PostgreSQL: every test that writes bookkeeping runs on both
    (SQLite does not enforce column widths)."""
    from sql.database import upgrade

    url = (f"sqlite:///{tmp_path / 'triage.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    upgrade(url)
    return url


@pytest.fixture
def redis_url():
    """A Redis database number of its own, emptied before and after the test."""
    import redis

    db = 8 + secrets.randbelow(7)
    client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
    client.flushdb()
    yield f"{REDIS_URL}/{db}"
    client.flushdb()


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
        log = (self.workdir / "orthanc.log").open("wb")
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._alive, 30, what="Orthanc to answer")
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

    def find_instances(self, **query: str) -> list[str]:
        return self.post("/tools/find", {"Level": "Instance", "Query": query})

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None


@pytest.fixture
def orthanc(tmp_path_factory):
    instance = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny Prima bundle with random weights: for tests of the service, where accuracy is not the point."""
    from models.bundle import random_bundle, save_bundle

    folder = tmp_path_factory.mktemp("bundle")
    bundle = random_bundle("tiny", seed=0)
    save_bundle(folder, bundle.vqvae, bundle.prima, bundle.manifest)
    return folder
