"""Audit log of the HTTP API: one row per request (who, what, when, with which result) and the studies each
request showed or changed (sql/audit_schema.py).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 02:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("principal", sa.String(length=128), nullable=True),
        sa.Column("role", sa.String(length=32), nullable=True),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=16), nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_principal", "audit_log", ["principal"])
    op.create_table(
        "audit_studies",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("audit_id", _ID, sa.ForeignKey("audit_log.id", ondelete="CASCADE"), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
    )
    op.create_index("ix_audit_studies_audit_id", "audit_studies", ["audit_id"])
    op.create_index("ix_audit_studies_study_instance_uid", "audit_studies", ["study_instance_uid"])


def downgrade() -> None:
    op.drop_table("audit_studies")
    op.drop_table("audit_log")
