"""Routing rules, forwarding and pulling: how each series arrived, the run's lane and routing decision, deliveries
of image sets (forwards), and pull jobs with their studies.

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-04 09:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("calling_aet", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("called_aet", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("peer_address", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("source", sa.String(length=16), nullable=True))

    with op.batch_alter_table("processing_runs") as batch:
        batch.add_column(sa.Column("lane", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("routing", sa.JSON(), nullable=True))

    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="sr"))
        batch.add_column(sa.Column("stage", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("study_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("study_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("files", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
        batch.alter_column("run_id", existing_type=sa.Integer(), nullable=True)
        batch.alter_column("sop_instance_uid", existing_type=sa.String(length=64), nullable=True)
        batch.create_foreign_key("fk_deliveries_study_id_studies", "studies", ["study_id"], ["id"],
                                 ondelete="CASCADE")
        batch.create_index("ix_deliveries_study_id", ["study_id"], unique=False)
        batch.create_unique_constraint("uq_delivery_files", ["study_id", "study_version", "destination", "kind"])

    op.create_table(
        "pull_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("query", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queried_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "pull_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("modalities", sa.String(length=64), nullable=True),
        sa.Column("expected_instances", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("instances_received", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["pull_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "study_instance_uid", name="uq_pull_item"),
    )
    with op.batch_alter_table("pull_items") as batch:
        batch.create_index("ix_pull_items_job_id", ["job_id"], unique=False)
        batch.create_index("ix_pull_items_study_instance_uid", ["study_instance_uid"], unique=False)


def downgrade() -> None:
    op.drop_table("pull_items")
    op.drop_table("pull_jobs")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint("uq_delivery_files", type_="unique")
        batch.drop_index("ix_deliveries_study_id")
        batch.drop_constraint("fk_deliveries_study_id_studies", type_="foreignkey")
        batch.alter_column("sop_instance_uid", existing_type=sa.String(length=64), nullable=False)
        batch.alter_column("run_id", existing_type=sa.Integer(), nullable=False)
        for column in ("queued_at", "files", "study_version", "study_id", "stage", "kind"):
            batch.drop_column(column)
    with op.batch_alter_table("processing_runs") as batch:
        batch.drop_column("routing")
        batch.drop_column("lane")
    with op.batch_alter_table("series") as batch:
        for column in ("source", "peer_address", "called_aet", "calling_aet"):
            batch.drop_column(column)
