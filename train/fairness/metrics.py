"""Prometheus gauges for the fairness headline figures, set after each refresh.

They live in the default registry, so whatever serves ``/metrics`` in the process shows them; the scheduled
refresh (``triage fairness refresh --every``) serves them itself on ``fairness.metrics_port``. Only single
attributes get a series of their own (intersections would multiply the series); the report has the rest.
"""
from __future__ import annotations

from prometheus_client import Gauge

from train.fairness.analysis import ALL_DIAGNOSES, FairnessResults

LONG_TURNAROUND_ODDS = Gauge(
    "triage_fairness_long_turnaround_odds_ratio",
    "Odds of a radiologist turnaround longer than the threshold, group against its reference group",
    ["threshold_days", "attribute", "group", "reference"])
RATE_DISPARITY = Gauge(
    "triage_fairness_rate_disparity",
    "Group rate minus diagnosis-matched population rate (bootstrap mean), pooled over diagnoses",
    ["metric", "attribute", "group"])
FINDINGS = Gauge(
    "triage_fairness_findings",
    "Significant long-turnaround odds ratios and flagged TPR/FPR disparities in the latest refresh",
    ["kind"])
TURNAROUND_MEDIAN = Gauge(
    "triage_turnaround_median_seconds", "Median turnaround over all studies in the latest refresh", ["measure"])
TURNAROUND_P90 = Gauge(
    "triage_turnaround_p90_seconds", "90th percentile turnaround over all studies in the latest refresh",
    ["measure"])
LAST_REFRESH = Gauge("triage_fairness_last_refresh_timestamp_seconds", "When the latest fairness refresh finished")
STUDIES = Gauge("triage_fairness_studies", "Studies in the latest fairness refresh", ["state"])


def publish(results: FairnessResults, finished_at: float) -> None:
    """Set every gauge from ``results`` (series of groups that vanished are removed)."""
    single = set(results.parameters.get("attributes", ()))
    LONG_TURNAROUND_ODDS.clear()
    for row in results.odds:
        if row.attribute in single and row.odds_ratio is not None:
            LONG_TURNAROUND_ODDS.labels(f"{row.threshold_days:g}", row.attribute, row.group_value,
                                        row.reference_value).set(row.odds_ratio)
    RATE_DISPARITY.clear()
    for row in results.disparities:
        if row.diagnosis == ALL_DIAGNOSES and row.attribute in single and row.disparity is not None:
            RATE_DISPARITY.labels(row.metric, row.attribute, row.group_value).set(row.disparity)
    odds, disparities = results.findings()
    FINDINGS.labels("long_turnaround").set(len(odds))
    FINDINGS.labels("tpr").set(sum(d.metric == "tpr" for d in disparities))
    FINDINGS.labels("fpr").set(sum(d.metric == "fpr" for d in disparities))
    for row in results.summaries:
        if row.attribute == "all" and row.median_s is not None:
            TURNAROUND_MEDIAN.labels(row.measure).set(row.median_s)
            TURNAROUND_P90.labels(row.measure).set(row.p90_s)
    STUDIES.labels("all").set(results.n_studies)
    STUDIES.labels("reported").set(results.n_reported)
    LAST_REFRESH.set(finished_at)
