"""The fairness results (SQLAlchemy Core): each refresh, and the turnaround odds, rate disparities and turnaround
summaries it found, written by the fairness refresh and read by the API and the report.

They share ``sql.base.metadata`` (``sql.schema`` imports this module); migration ``0002`` creates them.
"""
from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, DateTime, Float, ForeignKey, Integer, String, Table, Text

from sql.base import metadata

fairness_refreshes = Table(
    "fairness_refreshes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    # running | done | failed
    Column("status", String(16), nullable=False),
    # database | cohort:<file>
    Column("source", Text, nullable=False),
    Column("n_studies", Integer),
    Column("n_reported", Integer),
    Column("parameters", JSON),
    Column("error", Text),
)

fairness_turnaround_odds = Table(
    "fairness_turnaround_odds",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("refresh_id", Integer, ForeignKey("fairness_refreshes.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("measure", String(16), nullable=False),
    Column("threshold_days", Float, nullable=False),
    # An attribute name, or names joined by "&" for an intersectional group.
    Column("attribute", String(128), nullable=False),
    Column("group_value", String(256), nullable=False),
    Column("reference_value", String(256), nullable=False),
    Column("n_group", Integer, nullable=False),
    Column("n_group_long", Integer, nullable=False),
    Column("n_reference", Integer, nullable=False),
    Column("n_reference_long", Integer, nullable=False),
    Column("odds_ratio", Float),
    Column("ci_low", Float),
    Column("ci_high", Float),
    Column("p_value", Float),
    Column("p_adjusted", Float),
    Column("significant", Boolean, nullable=False),
    # Why a group was not tested (too small), or empty.
    Column("note", Text),
)

fairness_rate_disparities = Table(
    "fairness_rate_disparities",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("refresh_id", Integer, ForeignKey("fairness_refreshes.id", ondelete="CASCADE"), nullable=False,
           index=True),
    # tpr (equalized opportunity) | fpr (with tpr: equalized odds)
    Column("metric", String(8), nullable=False),
    # A diagnosis label, or "all" for every analysed diagnosis pooled (diagnosis-matched).
    Column("diagnosis", String(96), nullable=False),
    Column("attribute", String(128), nullable=False),
    Column("group_value", String(256), nullable=False),
    Column("n_group", Integer, nullable=False),
    Column("n_population", Integer, nullable=False),
    Column("group_rate", Float),
    Column("population_rate", Float),
    # Mean over bootstrap iterations of (group rate - diagnosis-matched population rate).
    Column("disparity", Float),
    # One-sided Mann-Whitney U over the bootstrap rates (tpr: group lower; fpr: group higher).
    Column("p_value", Float),
    Column("p_adjusted", Float),
    # Fisher's exact test of the group against the rest of the population, on the observed counts.
    Column("exact_p_value", Float),
    Column("exact_p_adjusted", Float),
    Column("flagged", Boolean, nullable=False),
    Column("bootstrap_group", JSON),
    Column("bootstrap_population", JSON),
    Column("note", Text),
)

fairness_turnaround_summary = Table(
    "fairness_turnaround_summary",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("refresh_id", Integer, ForeignKey("fairness_refreshes.id", ondelete="CASCADE"), nullable=False,
           index=True),
    # ai (last image to SR acknowledged) | queue (queued to started) | radiologist (exam to final report)
    Column("measure", String(16), nullable=False),
    Column("attribute", String(128), nullable=False),
    Column("group_value", String(256), nullable=False),
    Column("n", Integer, nullable=False),
    Column("median_s", Float),
    Column("p90_s", Float),
    Column("mean_s", Float),
)
