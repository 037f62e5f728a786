"""Slice-embedding index: one row per vector id of the faiss index, with its study, series, model and vector
(sql/slice_index_schema.py).

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-05 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "slice_embeddings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("processing_runs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("n_slices", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_slice_embeddings_study_instance_uid", "slice_embeddings", ["study_instance_uid"])
    op.create_index("ix_slice_embeddings_model_level", "slice_embeddings", ["model", "series_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_slice_embeddings_model_level", table_name="slice_embeddings")
    op.drop_index("ix_slice_embeddings_study_instance_uid", table_name="slice_embeddings")
    op.drop_table("slice_embeddings")
