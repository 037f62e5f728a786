"""`triage fairness report` writes an HTML report whose plots render in headless Chromium.

The screenshot is left in test-output/ for a person to look at.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.processes import REPO
from train.fairness.make_cohort import DEFAULT_OUT

OUTPUT = REPO / "test-output"
HIGHLIGHT_RGB = (0xC0, 0x39, 0x2B)  # the report's colour for significant / flagged groups


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


def test_report_command_names_both_planted_effects(report):
    _, summary = report
    turnaround = {(f["attribute"], f["group"], f["threshold_days"]) for f in summary["long_turnaround_findings"]}
    assert ("region", "north", 7.0) in turnaround
    disparities = {(f["metric"], f["diagnosis"], f["attribute"], f["group"])
                   for f in summary["rate_disparity_findings"]}
    assert ("tpr", "all", "age_band", "80+") in disparities


def test_report_holds_the_plots_and_the_tables_behind_them(report):
    page = report[0].read_text()
    plot_ids = re.findall(r'<img class="plot" id="([\w.-]+)"[^>]*src="data:image/png;base64,', page)
    assert plot_ids == ["forest-3", "forest-7", "boxes-tpr", "boxes-fpr", "distributions"]
    assert page.count("<table>") >= 6 and "north" in page and "80+" in page


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
