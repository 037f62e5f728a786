"""Schemathesis against the OpenAPI document of a real `triage api` on PostgreSQL: whatever a client sends to any
documented route, with an administrator's token (which reaches every route) or without one, the answer is never a
server error. A bounded number of examples per route keeps it to a CI-sized run."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.api_process import ApiProcess

pytestmark = pytest.mark.slow
ADMIN_TOKEN = "tok-admin-" + "a" * 36
#: Examples per operation and phase: enough to reach every route's validation, small enough for CI.
MAX_EXAMPLES = 25


def schemathesis() -> list[str]:
    found = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    if not Path(found).exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    return [found]


@pytest.mark.parametrize("with_token", [True, False], ids=["admin", "anonymous"])
def test_no_generated_request_makes_the_api_answer_500(tmp_path, postgres_url, with_token):
    api = ApiProcess(tmp_path, postgres_url, {"ops": ("admin", ADMIN_TOKEN)}).start()
    try:
        command = [*schemathesis(), "run", f"{api.url}/openapi.json", "--checks", "not_a_server_error",
                   "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--request-timeout", "60"]
        if with_token:
            command += ["--header", f"Authorization: Bearer {ADMIN_TOKEN}"]
        # In the test's folder: schemathesis keeps a cache of what it found in its working directory.
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    finally:
        api.stop()
    failures = result.stdout[result.stdout.find("FAILURES"):][:6000]
    errors = "\n".join(line for line in api.log().splitlines() if not line.startswith("INFO:"))[-3000:]
    assert result.returncode == 0, failures + errors
