"""Radiologists' feedback on AI results (agree / disagree per finding and priority, IHE AIR accept / reject).

Revision ID: 0009
Revises: 0008
Create Date: 2027-01-20 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ai_feedback",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("processing_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("label", sa.String(length=96), nullable=False),
        sa.Column("ai_value", sa.String(length=16), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("comment", sa.Text()),
        sa.Column("principal", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ai_feedback_study_instance_uid", "ai_feedback", ["study_instance_uid"])
    op.create_index("ix_ai_feedback_run_id", "ai_feedback", ["run_id"])
    op.create_index("ix_ai_feedback_created_at", "ai_feedback", ["created_at"])


def downgrade() -> None:
    op.drop_table("ai_feedback")
