"""Slice-embedding index partitions: each vector's modality and body region, so that similar prior studies are
searched only among studies of the same kind (brain MR never finds CT heads). Rows written before this revision
get the empty partition, which no new study searches; `triage index rebuild` after re-processing fills it.

Revision ID: 0008
Revises: 0007
Create Date: 2027-01-10 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("slice_embeddings") as batch:
        batch.add_column(sa.Column("index_partition", sa.String(length=64), nullable=False, server_default=""))
    op.create_index("ix_slice_embeddings_partition", "slice_embeddings",
                    ["model", "index_partition", "series_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_slice_embeddings_partition", table_name="slice_embeddings")
    with op.batch_alter_table("slice_embeddings") as batch:
        batch.drop_column("index_partition")
