"""Running the whole service as separate processes (`triage serve`, `triage worker`), as in production."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from sqlalchemy import create_engine, select

from sql.schema import processing_runs
from tests.support.processes import REPO, free_port, start_process, stop_process, wait_for

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class Service:
    def __init__(self, workdir: Path, database_url: str, broker_url: str, bundle: Path, **overrides) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.scp_port = free_port()
        config = {
            "var_dir": str(workdir / "var"),
            "database": {"url": database_url},
            "broker": {"url": broker_url},
            "scp": {"port": self.scp_port, "allowed_calling_aets": ["MODALITY"]},
            "metrics": {"serve_port": 0},
            "assembly": {"quiet_period_s": 1, "poll_interval_s": 0.5},
            "model": {"bundle": str(bundle), "device": "cpu"},
            # These tests are about the service under faults and load; LIME is tested where it is the point.
            "explain": {"enabled": False},
        }
        for section, values in overrides.items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        self.config_path = workdir / "triage.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, "TRIAGE_CONFIG": str(self.config_path)}
        self.processes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("ab")
        process = start_process([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def start_serve(self) -> None:
        self._start("serve", ["serve"])
        wait_for(lambda: b"listening" in (self.workdir / "serve.log").read_bytes()
                 or self.processes["serve"].poll() is not None, 90, what="the SCP to listen")
        assert self.processes["serve"].poll() is None, self.log("serve")

    def start_worker(self, name: str, hostname: str | None = None) -> subprocess.Popen:
        return self._start(name, ["worker", "--hostname", hostname or f"{name}@localhost", "--loglevel", "INFO"])

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-6000:]

    def send(self, folder: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["storescu", "-aet", "MODALITY", "-aec", "TRIAGE", "+sd", "+r", "127.0.0.1", str(self.scp_port),
             str(folder)], capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout)

    def runs(self) -> list:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as c:
                return c.execute(select(processing_runs).order_by(processing_runs.c.id)).all()
        except Exception:
            return []
        finally:
            engine.dispose()

    def stop(self) -> None:
        for process in self.processes.values():  # all asked at once: each takes a while to shut down
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            stop_process(process, grace_s=20)
