"""`triage demo`, the first command of the README, end to end: also on a machine whose cores are all busy."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO

pytestmark = pytest.mark.slow


def _run_demo(workdir: Path, bundle: Path) -> subprocess.CompletedProcess:
    # The bundle the demo would train on first use (minutes on a CPU); the network path is what is tested here.
    shutil.copytree(bundle, workdir / "bundle")
    return subprocess.run([sys.executable, "-m", "worker.cli", "demo", "--workdir", str(workdir)], cwd=REPO,
                          env={**os.environ, "COLUMNS": "160"}, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("load", ["idle", "every core busy"])
def test_the_demo_sends_its_study_over_dicom_and_prints_the_structured_report(load, tmp_path, tiny_bundle, request):
    if load != "idle":
        request.getfixturevalue("cpu_stress")
    result = _run_demo(tmp_path, tiny_bundle)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Structured report" in output and "Worklist priority:" in output
    # The C-STORE answers all reached the demo: none was taken by pynetdicom's reactor.
    assert "unexpected C-STORE" not in output and "DIMSE timeout" not in output
