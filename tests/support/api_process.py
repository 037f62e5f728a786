"""A real `triage api` process for the security tests: its configuration, token files, port, memory and log."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from sql.database import upgrade
from tests.support.processes import REPO, free_port, start_process, stop_process, wait_for


def merged(base: dict, override: dict) -> dict:
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


class ApiProcess:
    """`python -m worker.cli --config <file> api` on a free loopback port.

    ``tokens``: name -> (role, token); each token is written to its own file named in ``api.tokens``.
    ``config``: more configuration, merged over the defaults of this harness."""

    def __init__(self, workdir: Path, database_url: str, tokens: dict[str, tuple[str, str]],
                 config: dict | None = None, migrate: bool = True) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tokens = dict(tokens)
        entries = []
        for name, (role, token) in tokens.items():
            path = workdir / f"{name}.token"
            path.write_text(token + "\n")
            entries.append({"name": name, "role": role, "token_file": str(path)})
        self.config = merged({
            "var_dir": str(workdir / "var"),
            "database": {"url": database_url},
            # Each request asks the database: a revocation is seen at once, whatever the replica.
            "api": {"host": "127.0.0.1", "port": self.port, "tokens": entries, "token_cache_s": 0},
        }, config or {})
        self.config_path = workdir / "triage.yaml"
        self.write_config()
        if migrate:
            upgrade(database_url)
        self.process: subprocess.Popen | None = None

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def token_file(self, name: str) -> Path:
        return self.workdir / f"{name}.token"

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name][1]}"}

    def start(self) -> ApiProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        log = (self.workdir / "api.log").open("ab")
        self.process = start_process([sys.executable, "-m", "worker.cli", "--config", str(self.config_path), "api"],
                                     cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"triage api exited: {self.log()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).is_success
            except httpx.HTTPError:
                return False

        try:
            wait_for(up, 60, interval=0.2, what="triage api")
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        return (self.workdir / "api.log").read_text(errors="replace")[-6000:]

    def memory_kib(self, field: str = "VmHWM") -> int:
        """The process's peak (VmHWM) or current (VmRSS) resident memory, KiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} for {self.process.pid}")

    def stop(self) -> None:
        stop_process(self.process, grace_s=15)
