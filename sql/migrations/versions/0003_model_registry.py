"""Model registry and training bookkeeping: training runs and their metrics, model versions, promotions and
rollbacks, stored study embeddings (sql/registry_schema.py).

Numbered 0003 as reserved for it; 0004 and 0005 landed first on top of 0002, so this revision follows 0005 to
keep one line of history (one head).

Revision ID: 0003
Revises: 0005
Create Date: 2026-12-04 12:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("base_version", sa.String(length=128), nullable=True),
        sa.Column("candidate_version", sa.String(length=128), nullable=True),
        sa.Column("decision", sa.String(length=16), nullable=True),
        sa.Column("n_new_studies", sa.Integer(), nullable=True),
        sa.Column("n_train", sa.Integer(), nullable=True),
        sa.Column("n_held_out", sa.Integer(), nullable=True),
        sa.Column("checkpoint", sa.Text(), nullable=True),
        sa.Column("parameters", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_table(
        "training_metrics",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("training_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=96), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_training_metrics_run_id", "training_metrics", ["run_id"])
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version", sa.String(length=128), nullable=False, unique=True),
        sa.Column("bundle_path", sa.Text(), nullable=False),
        sa.Column("family", sa.String(length=32), nullable=True),
        sa.Column("config", sa.String(length=32), nullable=True),
        sa.Column("backbone_id", sa.String(length=64), nullable=True),
        sa.Column("parent_version", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("gates", sa.JSON(), nullable=True),
        sa.Column("training_run_id", sa.Integer(), sa.ForeignKey("training_runs.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("notes", sa.Text(), nullable=True),
    )
    op.create_table(
        "model_promotions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_version_id", sa.Integer(), sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_model_promotions_model_version_id", "model_promotions", ["model_version_id"])
    op.create_table(
        "study_embeddings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("backbone_id", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_instance_uid", "backbone_id", name="uq_study_embedding"),
    )
    op.create_index("ix_study_embeddings_backbone_id", "study_embeddings", ["backbone_id"])


def downgrade() -> None:
    op.drop_table("study_embeddings")
    op.drop_table("model_promotions")
    op.drop_table("model_versions")
    op.drop_table("training_metrics")
    op.drop_table("training_runs")
