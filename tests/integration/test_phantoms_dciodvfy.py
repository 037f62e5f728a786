"""Every series of a phantom study passes dciodvfy (dicom3tools)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.phantoms import all_series_study  # noqa: F401 (the fixture)
from train.phantoms import PhantomStudy

pytestmark = pytest.mark.needs_dcmtk


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors_for_any_series(all_series_study: PhantomStudy) -> None:
    for uid, description in all_series_study.series.items():
        first = min((all_series_study.folder / uid).glob("*.dcm"))
        result = subprocess.run(["dciodvfy", str(first)], capture_output=True, text=True, timeout=60,
                                check=False)
        report = result.stdout + result.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert "MRImage" in report, report
        assert not errors, f"{description}: {errors}"
