"""`triage fairness report` writes an HTML report whose plots render in headless Chromium.

The screenshot is left in test-output/ for a person to look at.
"""
from __future__ import annotations

import re

from tests.support.fairness_report import report  # noqa: F401 (the fixture)


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


