"""The fairness report renders in headless Chromium with its plots."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.support.fairness_report import OUTPUT, chromium, report  # noqa: F401 (the fixture)

HIGHLIGHT_RGB = (0xC0, 0x39, 0x2B)  # the report's colour for significant / flagged groups


@pytest.mark.needs_chromium  # runs Chromium itself, not through the chromium fixture
def test_report_renders_in_headless_chromium_with_its_plots(report, tmp_path):
    html_path, _ = report
    screenshot = OUTPUT / "fairness_report.png"
    screenshot.unlink(missing_ok=True)
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,3000",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", html_path.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and screenshot.exists(), result.stderr[-2000:]
    image = np.asarray(Image.open(screenshot).convert("RGB"))
    assert image.shape[:2] == (3000, 1280)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 500  # text, tables, markers: not a blank page
    # The plots are there: the red of the significant groups' markers and boxes is drawn.
    red = np.all(np.abs(image.astype(int) - HIGHLIGHT_RGB) <= 12, axis=-1)
    assert red.sum() > 200
