"""Final reports, ground truth labels, sensitive attributes, HL7 message log, fairness results; reporting views.

The views are the files under ``sql/views/0002`` (applied in name order, see ``sql.reporting_views``). A later
migration that makes SQLite rebuild a table these views read must drop the views first and create them after.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 09:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from sql.reporting_views import create_views, drop_views

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ATTRIBUTES = ("sex", "age_band", "ethnic_group", "region", "density_quartile", "scheduling",
              "scanner_manufacturer", "scanner_model", "insurance_class")


def upgrade() -> None:
    op.create_table(
        "study_attributes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("exam_at", sa.DateTime(timezone=True), nullable=True),
        *(sa.Column(name, sa.String(length=64), nullable=False) for name in ATTRIBUTES),
        sa.Column("sources", sa.JSON(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_instance_uid"),
    )
    op.create_index(op.f("ix_study_attributes_accession_number"), "study_attributes", ["accession_number"])

    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=2), nullable=False),
        sa.Column("exam_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("source_message_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "source_message_id", name="uq_report_source_message"),
    )
    op.create_index(op.f("ix_reports_study_instance_uid"), "reports", ["study_instance_uid"])
    op.create_index(op.f("ix_reports_accession_number"), "reports", ["accession_number"])

    op.create_table(
        "ground_truth_labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=96), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("report_id", "label", "source", name="uq_ground_truth_label"),
    )
    op.create_index(op.f("ix_ground_truth_labels_report_id"), "ground_truth_labels", ["report_id"])

    op.create_table(
        "hl7_messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("peer", sa.String(length=64), nullable=True),
        sa.Column("control_id", sa.String(length=64), nullable=True),
        sa.Column("message_type", sa.String(length=16), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("ack_code", sa.String(length=2), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("size_bytes", sa.Integer(), nullable=True),
        sa.Column("report_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_hl7_messages_received_at"), "hl7_messages", ["received_at"])

    op.create_table(
        "fairness_refreshes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("n_studies", sa.Integer(), nullable=True),
        sa.Column("n_reported", sa.Integer(), nullable=True),
        sa.Column("parameters", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )

    op.create_table(
        "fairness_turnaround_odds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("refresh_id", sa.Integer(), nullable=False),
        sa.Column("measure", sa.String(length=16), nullable=False),
        sa.Column("threshold_days", sa.Float(), nullable=False),
        sa.Column("attribute", sa.String(length=128), nullable=False),
        sa.Column("group_value", sa.String(length=256), nullable=False),
        sa.Column("reference_value", sa.String(length=256), nullable=False),
        sa.Column("n_group", sa.Integer(), nullable=False),
        sa.Column("n_group_long", sa.Integer(), nullable=False),
        sa.Column("n_reference", sa.Integer(), nullable=False),
        sa.Column("n_reference_long", sa.Integer(), nullable=False),
        sa.Column("odds_ratio", sa.Float(), nullable=True),
        sa.Column("ci_low", sa.Float(), nullable=True),
        sa.Column("ci_high", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("p_adjusted", sa.Float(), nullable=True),
        sa.Column("significant", sa.Boolean(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["refresh_id"], ["fairness_refreshes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_fairness_turnaround_odds_refresh_id"), "fairness_turnaround_odds", ["refresh_id"])

    op.create_table(
        "fairness_rate_disparities",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("refresh_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(length=8), nullable=False),
        sa.Column("diagnosis", sa.String(length=96), nullable=False),
        sa.Column("attribute", sa.String(length=128), nullable=False),
        sa.Column("group_value", sa.String(length=256), nullable=False),
        sa.Column("n_group", sa.Integer(), nullable=False),
        sa.Column("n_population", sa.Integer(), nullable=False),
        sa.Column("group_rate", sa.Float(), nullable=True),
        sa.Column("population_rate", sa.Float(), nullable=True),
        sa.Column("disparity", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("p_adjusted", sa.Float(), nullable=True),
        sa.Column("exact_p_value", sa.Float(), nullable=True),
        sa.Column("exact_p_adjusted", sa.Float(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("bootstrap_group", sa.JSON(), nullable=True),
        sa.Column("bootstrap_population", sa.JSON(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["refresh_id"], ["fairness_refreshes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_fairness_rate_disparities_refresh_id"), "fairness_rate_disparities", ["refresh_id"])

    op.create_table(
        "fairness_turnaround_summary",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("refresh_id", sa.Integer(), nullable=False),
        sa.Column("measure", sa.String(length=16), nullable=False),
        sa.Column("attribute", sa.String(length=128), nullable=False),
        sa.Column("group_value", sa.String(length=256), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("median_s", sa.Float(), nullable=True),
        sa.Column("p90_s", sa.Float(), nullable=True),
        sa.Column("mean_s", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["refresh_id"], ["fairness_refreshes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_fairness_turnaround_summary_refresh_id"), "fairness_turnaround_summary",
                    ["refresh_id"])

    create_views(op, revision)


def downgrade() -> None:
    drop_views(op, revision)
    for table in ("fairness_turnaround_summary", "fairness_rate_disparities", "fairness_turnaround_odds",
                  "fairness_refreshes", "hl7_messages", "ground_truth_labels", "reports", "study_attributes"):
        op.drop_table(table)
