"""`triage api` as its own process serves HTTPS with the configured certificate and refuses plain HTTP."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from sql.database import upgrade
from tests.support.pki import TestPKI
from tests.support.processes import free_port, start_process, wait_for


def test_triage_api_serves_https_and_refuses_plain_http(tmp_path):
    pki = TestPKI(tmp_path / "pki")
    server = pki.issue("triage-api", server=True)
    port = free_port()
    (tmp_path / "admin.token").write_text("tok-admin-" + "z" * 30)
    config = {
        "var_dir": str(tmp_path / "var"), "database": {"url": f"sqlite:///{tmp_path / 'api.db'}"},
        "api": {"host": "127.0.0.1", "port": port,
                "tls": {"cert": str(server.cert), "key": str(server.key)},
                "tokens": [{"name": "ops", "role": "admin", "token_file": str(tmp_path / "admin.token")}]},
    }
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(config))
    upgrade(f"sqlite:///{tmp_path / 'api.db'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    process = start_process([sys.executable, "-m", "worker.cli", "--config", str(tmp_path / "triage.yaml"), "api"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(process.stdout.read().decode())
            try:
                return httpx.get(f"https://127.0.0.1:{port}/healthz", verify=str(pki.ca), timeout=2).is_success
            except httpx.HTTPError:
                return False

        wait_for(up, 60, interval=0.3, what="triage api over HTTPS")
        response = httpx.get(f"https://127.0.0.1:{port}/admin/config", verify=str(pki.ca),
                             headers={"Authorization": "Bearer tok-admin-" + "z" * 30})
        assert response.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate stops
            httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        time.sleep(0.1)
