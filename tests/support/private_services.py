"""Private Redis and PostgreSQL servers for fault tests: killed and restarted by the test, on free ports.

The machine's own Redis and PostgreSQL are shared by every test; stopping them would be felt elsewhere, so the
tests that stop a server start their own.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.processes import free_port, start_process, stop_process, wait_for


class PrivateRedis:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PrivateRedis":
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        # No persistence, like the machine's Redis: a restart loses every queued message.
        self.process = start_process(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        wait_for(lambda: _pings(redis.Redis(port=self.port)), 20, what="private Redis")
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            stop_process(self.process)  # forget it (and anything left in its group)
            self.process = None


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


class PrivatePostgres:
    """A throw-away cluster (initdb) run as the postgres user, trust auth, on a free port."""

    def __init__(self) -> None:
        # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
        self.datadir = Path(tempfile.mkdtemp(prefix="triage-pg-")) / "pgdata"
        self.port = free_port()
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            pytest.skip("PostgreSQL server binaries are not installed")
        self.bin = Path(bins[-1])

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess:
        command = [*args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def init(self) -> "PrivatePostgres":
        self.datadir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.datadir, "postgres", "postgres")
            shutil.chown(self.datadir.parent, "postgres", "postgres")
        result = self._as_postgres(str(self.bin / "initdb"), "-D", str(self.datadir), "-A", "trust", "-U",
                                   "postgres", "--no-sync")
        assert result.returncode == 0, result.stderr
        return self.start()

    def start(self) -> "PrivatePostgres":
        result = self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-w", "-l",
                                   str(self.datadir / "log"), "-o",
                                   f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off",
                                   "start")
        assert result.returncode == 0, result.stderr + result.stdout
        return self

    def stop(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.datadir.parent, ignore_errors=True)

