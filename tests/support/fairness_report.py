"""The fairness report that `triage fairness report` writes (made once per module), and the headless Chromium
that renders it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO
from train.fairness.make_cohort import DEFAULT_OUT

OUTPUT = REPO / "test-output"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless Chromium is not installed (run ops/setup.sh)")


@pytest.fixture(scope="module")
def report() -> tuple[Path, dict]:
    OUTPUT.mkdir(exist_ok=True)
    out = OUTPUT / "fairness_report.html"
    result = subprocess.run([sys.executable, "-m", "worker.cli", "fairness", "report", "--cohort", str(DEFAULT_OUT),
                             "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout.strip().splitlines()[-1])
