"""The README's quickstart, followed verbatim in a scratch folder: its shell commands run as written (with this
test's own ports, through the environment variables the README names) and reach the worklist page."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.processes import REPO, free_port, start_process, wait_for
from worker.config import Settings

pytestmark = [pytest.mark.slow, pytest.mark.needs_dcmtk]

SECTION = "## Quickstart: day one"


def quickstart() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end != -1 else None]


def shell_commands(section: str) -> str:
    return "\n".join(re.findall(r"^```bash\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL))


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read().decode()


def test_the_quickstart_names_the_default_ports_and_ae_title():
    section = quickstart()
    assert f"AE title `{Settings().scp.ae_title}`, port {Settings().scp.port}" in section
    assert f"http://127.0.0.1:{Settings().api.port}/worklist/" in section
    assert f"http://127.0.0.1:{Settings().metrics.serve_port}/metrics" in section
    for variable in ("TRIAGE_SCP__PORT", "TRIAGE_API__PORT", "TRIAGE_METRICS__SERVE_PORT"):
        assert variable in section


def test_the_quickstart_commands_reach_the_worklist_page(tmp_path):
    script = shell_commands(quickstart())
    assert "triage api" in script and "triage serve" in script
    scp_port, api_port, metrics_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
               PYTHONPATH=str(REPO), TRIAGE_SCP__PORT=str(scp_port), TRIAGE_API__PORT=str(api_port),
               TRIAGE_METRICS__SERVE_PORT=str(metrics_port))
    # Its own session: the commands leave the receiver and the API running in the background, as a user's would.
    shell = start_process(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    site = tmp_path / "triage-site"
    try:
        output, _ = shell.communicate(timeout=180)
        assert shell.returncode == 0, output
        token = (site / "reading-room.token").read_text().strip()
        assert len(token) >= 32 and (site / "reading-room.token").stat().st_mode & 0o077 == 0

        def answers(url: str):
            try:
                return get(url)
            except OSError:
                return None

        def logs() -> str:
            return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in site.glob("*.log"))

        base = f"http://127.0.0.1:{api_port}"
        status, page = wait_for(lambda: answers(f"{base}/worklist/"), 90, what=f"the worklist page\n{logs()}")
        assert status == 200 and "<title>AI triage worklist</title>" in page
        assert json.loads(get(f"{base}/worklist/me", token)[1]) == {"name": "reading-room", "role": "radiologist"}
        assert get(f"{base}/")[0] == 200
        # the receiver is up on the test's ports too
        assert wait_for(lambda: answers(f"http://127.0.0.1:{metrics_port}/healthz"), 60,
                        what=f"the receiver's health check\n{logs()}")[0] == 200
        echo = subprocess.run(["echoscu", "-aet", "PACS", "-aec", "TRIAGE", "127.0.0.1", str(scp_port)],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
    finally:
        try:
            os.killpg(shell.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        wait_for(lambda: not _group_alive(shell.pid), 30, what="the quickstart's processes to stop")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
