"""The fairness report: one self-contained HTML page (plots embedded as PNG) with the tables behind the plots.

Plots: a forest plot of long-turnaround odds ratios per threshold, box plots of the bootstrap TPR and FPR
disparities per group, and turnaround distributions per group. Rendering uses Matplotlib's object API with the
Agg canvas (no pyplot state), so the web API can render pages from several threads.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from train.fairness.analysis import ALL_DIAGNOSES, DAY_S, FairnessResults, RateDisparity, TurnaroundOdds
from train.fairness.cohort import MEASURE_NAMES, Cohort


def plot_text(value: object) -> str:
    """A group value or attribute name as plot text: Matplotlib reads text between two ``$`` as math (and a
    stray one as a parse error), but group values come from senders (PID-22, Manufacturer), so every ``$`` is
    literal."""
    return str(value).replace("$", r"\$")


HIGHLIGHT, NEUTRAL, MUTED = "#c0392b", "#2c3e50", "#95a5a6"
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
tr.finding td { background: #fdecea; font-weight: 600; }
.meta { color: #555; } .plot { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.none { color: #2e7d32; font-weight: 600; } .note { color: #777; font-size: 0.9em; }
"""


def _png(figure: Figure) -> str:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(figure: Figure, alt: str, plot_id: str) -> str:
    return f'<img class="plot" id="{plot_id}" alt="{html.escape(alt)}" src="data:image/png;base64,{_png(figure)}">'


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def forest_plot(odds: Sequence[TurnaroundOdds], threshold: float, single: set[str]) -> Figure | None:
    rows = [o for o in odds if o.threshold_days == threshold and o.odds_ratio is not None
            and (o.attribute in single or o.significant) and o.odds_ratio > 0 and math.isfinite(o.odds_ratio)]
    if not rows:
        return None
    height = 0.26 * len(rows) + 1.3
    figure = Figure(figsize=(9, height))
    figure.subplots_adjust(left=0.42, right=0.97, top=1 - 0.45 / height, bottom=0.75 / height)
    axes = figure.add_subplot()
    for y, row in enumerate(reversed(rows)):
        colour = HIGHLIGHT if row.significant else NEUTRAL
        axes.plot([row.ci_low, row.ci_high], [y, y], color=colour, linewidth=1.5)
        axes.plot([row.odds_ratio], [y], "s", color=colour, markersize=5)
    axes.axvline(1.0, color=MUTED, linestyle="--", linewidth=1)
    axes.set_xscale("log")
    low = min(r.ci_low for r in rows)
    high = max(r.ci_high for r in rows)
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if low / 1.5 <= t <= high * 1.5]
    axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axes.minorticks_off()
    axes.set_yticks(range(len(rows)))
    axes.set_yticklabels([plot_text(f"{r.attribute}: {r.group_value} (vs {r.reference_value})")
                          for r in reversed(rows)],
                         fontsize=7)
    axes.set_xlabel(f"odds ratio of a radiologist turnaround over {threshold:g} days (95% CI, log scale)")
    axes.set_title(f"Long turnaround (> {threshold:g} days) by group; red: significant after correction",
                   fontsize=9)
    return figure


def disparity_boxes(disparities: Sequence[RateDisparity], metric: str, attributes: Sequence[str]) -> Figure | None:
    tested = [d for d in disparities if d.metric == metric and d.diagnosis == ALL_DIAGNOSES
              and d.bootstrap_group and d.attribute in attributes]
    shown = [a for a in attributes if any(d.attribute == a for d in tested)]
    if not shown:
        return None
    columns = 3
    lines = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(11, 2.9 * lines))
    figure.subplots_adjust(left=0.06, right=0.98, top=1 - 0.5 / (2.9 * lines), bottom=0.9 / (2.9 * lines),
                           hspace=0.75, wspace=0.2)
    for index, attribute in enumerate(shown):
        axes = figure.add_subplot(lines, columns, index + 1)
        rows = [d for d in tested if d.attribute == attribute]
        data = [np.array(d.bootstrap_group) - np.array(d.bootstrap_population) for d in rows]
        boxes = axes.boxplot(data, patch_artist=True, widths=0.6)
        for patch, row in zip(boxes["boxes"], rows):
            patch.set_facecolor(HIGHLIGHT if row.flagged else "#d6eaf8")
        axes.axhline(0.0, color=MUTED, linestyle="--", linewidth=1)
        axes.set_xticks(range(1, len(rows) + 1))
        axes.set_xticklabels([plot_text(d.group_value) for d in rows], rotation=35, ha="right", fontsize=7)
        axes.set_title(plot_text(attribute), fontsize=9)
        axes.tick_params(axis="y", labelsize=7)
    figure.suptitle(f"{metric.upper()} disparity per group: bootstrap group rate minus diagnosis-matched population "
                    f"rate (red: flagged)", fontsize=10)
    return figure


def turnaround_distributions(cohort: Cohort, attributes: Sequence[str], thresholds: Sequence[float]) -> Figure:
    shown = list(attributes)
    columns = 3
    lines = math.ceil((len(shown) + 2) / columns)
    figure = Figure(figsize=(11, 2.9 * lines))
    figure.subplots_adjust(left=0.06, right=0.98, top=0.97, bottom=0.9 / (2.9 * lines), hspace=0.75, wspace=0.2)
    days = cohort.durations["radiologist"] / DAY_S
    for index, attribute in enumerate(shown):
        axes = figure.add_subplot(lines, columns, index + 1)
        groups = cohort.groups(attribute)
        names = sorted({str(g) for g in groups}, key=str)
        data = [days[(groups == name) & ~np.isnan(days)] for name in names]
        keep = [i for i, values in enumerate(data) if values.size]
        axes.boxplot([data[i] for i in keep], showfliers=False, widths=0.6)
        for threshold in thresholds:
            axes.axhline(threshold, color=HIGHLIGHT, linestyle=":", linewidth=1)
        axes.set_xticks(range(1, len(keep) + 1))
        axes.set_xticklabels([plot_text(names[i]) for i in keep], rotation=35, ha="right", fontsize=7)
        axes.set_title(plot_text(f"radiologist turnaround (days) by {attribute}"), fontsize=9)
        axes.tick_params(axis="y", labelsize=7)
    for offset, (measure, unit, scale) in enumerate((("ai", "minutes", 60.0), ("queue", "seconds", 1.0))):
        axes = figure.add_subplot(lines, columns, len(shown) + offset + 1)
        values = cohort.durations[measure]
        values = values[~np.isnan(values)] / scale
        if values.size:
            axes.hist(values, bins=40, color="#5dade2")
        axes.set_title(f"{MEASURE_NAMES[measure].split(' (')[0]} ({unit})", fontsize=9)
        axes.tick_params(labelsize=7)
    return figure


def _odds_table(rows: Sequence[TurnaroundOdds]) -> str:
    head = ("<tr><th>threshold (days)</th><th class=text>attribute</th><th class=text>group</th>"
            "<th class=text>reference</th><th>long / n (group)</th><th>long / n (reference)</th><th>odds ratio</th>"
            "<th>95% CI</th><th>p</th><th>p adjusted</th><th class=text>note</th></tr>")
    body = "".join(
        f'<tr class="{"finding" if r.significant else ""}"><td>{r.threshold_days:g}</td>'
        f"<td class=text>{html.escape(r.attribute)}</td><td class=text>{html.escape(r.group_value)}</td>"
        f"<td class=text>{html.escape(r.reference_value)}</td><td>{r.n_group_long} / {r.n_group}</td>"
        f"<td>{r.n_reference_long} / {r.n_reference}</td><td>{_fmt(r.odds_ratio, 2)}</td>"
        f"<td>{_fmt(r.ci_low, 2)}–{_fmt(r.ci_high, 2)}</td><td>{_fmt(r.p_value, 4)}</td>"
        f"<td>{_fmt(r.p_adjusted, 4)}</td><td class=text>{html.escape(r.note or '')}</td></tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _disparity_table(rows: Sequence[RateDisparity]) -> str:
    head = ("<tr><th class=text>metric</th><th class=text>diagnosis</th><th class=text>attribute</th>"
            "<th class=text>group</th><th>units</th><th>group rate</th><th>population rate</th><th>disparity</th>"
            "<th>MWU p adj.</th><th>exact p adj.</th><th class=text>note</th></tr>")
    body = "".join(
        f'<tr class="{"finding" if r.flagged else ""}"><td class=text>{r.metric.upper()}</td>'
        f"<td class=text>{html.escape(r.diagnosis)}</td><td class=text>{html.escape(r.attribute)}</td>"
        f"<td class=text>{html.escape(r.group_value)}</td><td>{r.n_group}</td><td>{_fmt(r.group_rate)}</td>"
        f"<td>{_fmt(r.population_rate)}</td><td>{_fmt(r.disparity)}</td><td>{_fmt(r.p_adjusted, 4)}</td>"
        f"<td>{_fmt(r.exact_p_adjusted, 4)}</td><td class=text>{html.escape(r.note or '')}</td></tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _summary_table(results: FairnessResults) -> str:
    head = ("<tr><th class=text>measure</th><th class=text>attribute</th><th class=text>group</th><th>n</th>"
            "<th>median</th><th>90th percentile</th><th>mean</th></tr>")

    def duration(seconds: float | None) -> str:
        if seconds is None:
            return "–"
        return f"{seconds / DAY_S:.2f} d" if seconds >= DAY_S else f"{seconds / 60:.1f} min" if seconds >= 120 \
            else f"{seconds:.0f} s"

    body = "".join(
        f"<tr><td class=text>{s.measure}</td><td class=text>{html.escape(s.attribute)}</td>"
        f"<td class=text>{html.escape(s.group_value)}</td><td>{s.n}</td><td>{duration(s.median_s)}</td>"
        f"<td>{duration(s.p90_s)}</td><td>{duration(s.mean_s)}</td></tr>" for s in results.summaries)
    return f"<table>{head}{body}</table>"


def render_html(results: FairnessResults, cohort: Cohort | None = None, title: str = "Turnaround and fairness") -> str:
    """The whole report page. Without ``cohort`` the turnaround distributions are left out."""
    parameters = results.parameters
    single = list(parameters.get("attributes", ()))
    thresholds = [float(t) for t in parameters.get("long_turnaround_days", ())]
    odds_findings, disparity_findings = results.findings()
    generated = results.finished_at or datetime.now(UTC).isoformat(timespec="seconds")
    parts = [(f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
              f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"),
             (f'<p class=meta>Source: {html.escape(results.source)} · {results.n_studies} studies, '
             f"{results.n_reported} with a final report · refresh {results.refresh_id or '–'} · {generated}<br>"
             f"Long turnaround: over {', '.join(f'{t:g}' for t in thresholds)} days, Fisher's exact test against "
             f"each attribute's reference group. Disparities: bootstrap of {parameters.get('sample_size')} units × "
             f"{parameters.get('iterations')} iterations, diagnosis-matched, one-sided Mann-Whitney U, with Fisher's "
             f"exact test of the group against the rest. Correction: {html.escape(str(parameters.get('correction')))}"
             f", α = {parameters.get('alpha')}; a disparity is flagged when both tests are significant and it is at "
             f"least {parameters.get('min_disparity')} in size. Groups below {parameters.get('min_group_size')} "
             f"studies ({parameters.get('min_group_units')} units for rates) are not tested.</p>"),
             "<h2 id=findings>Findings</h2>"]
    if not odds_findings and not disparity_findings:
        parts.append("<p class=none>No group differs significantly.</p>")
    if odds_findings:
        parts.append("<h3>Long radiologist turnaround</h3>" + _odds_table(odds_findings))
    if disparity_findings:
        parts.append("<h3>TPR / FPR disparities</h3>" + _disparity_table(disparity_findings))

    parts.append("<h2 id=turnaround-odds>Odds of a long radiologist turnaround</h2>")
    for threshold in thresholds:
        figure = forest_plot(results.odds, threshold, set(single))
        if figure is not None:
            parts.append(_img(figure, f"odds ratio forest plot, {threshold:g} days", f"forest-{threshold:g}"))
    parts.append("<details><summary>All odds ratios</summary>" + _odds_table(results.odds) + "</details>")

    parts.append("<h2 id=disparities>TPR and FPR disparities</h2>")
    for metric in ("tpr", "fpr"):
        figure = disparity_boxes(results.disparities, metric, single)
        if figure is not None:
            parts.append(_img(figure, f"{metric.upper()} disparity box plots per group", f"boxes-{metric}"))
    pooled = [d for d in results.disparities if d.diagnosis == ALL_DIAGNOSES]
    parts.append("<details open><summary>Pooled over diagnoses</summary>" + _disparity_table(pooled) + "</details>")
    per_diagnosis = [d for d in results.disparities if d.diagnosis != ALL_DIAGNOSES]
    parts.append("<details><summary>Per diagnosis</summary>" + _disparity_table(per_diagnosis) + "</details>")

    parts.append("<h2 id=distributions>Turnaround</h2>")
    if cohort is not None and len(cohort):
        parts.append(_img(turnaround_distributions(cohort, single, thresholds), "turnaround distributions",
                          "distributions"))
    else:
        parts.append("<p class=note>No study-level data: distributions not drawn.</p>")
    parts.append("<details><summary>Turnaround by group</summary>" + _summary_table(results) + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)
