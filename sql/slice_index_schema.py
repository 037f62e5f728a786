"""The slice-embedding index's table (SQLAlchemy Core): which study and series each vector id stands for.

It shares ``sql.base.metadata`` (``sql.schema`` imports this module); migration ``0006`` creates
it. The faiss index file on disk holds vectors under these rows' ids; the rows also keep each vector itself, so
``triage index rebuild`` can make the index anew from the database (after a lost file, a deletion, or growing past
the exact-search size) without re-reading any image. Study-level rows (``series_instance_uid`` NULL) are the ones
searched for similar prior studies; series-level rows are kept for series-level search and evaluation.
"""
from __future__ import annotations

from sqlalchemy import Column, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Table

from sql.base import UID, metadata

slice_embeddings = Table(
    "slice_embeddings",
    metadata,
    # The id under which the vector is stored in the faiss index.
    Column("id", Integer, primary_key=True),
    Column("study_instance_uid", UID, nullable=False, index=True),
    # NULL: the study's embedding (median of its series); else that series' embedding (median of its slices).
    Column("series_instance_uid", UID),
    # The processing run that computed it (NULL once the run is deleted).
    Column("run_id", Integer, ForeignKey("processing_runs.id", ondelete="SET NULL")),
    # Which model made it, e.g. "medimageinsight-full:medimageinsigt-v1.0.0.pt": vectors of different models are
    # not comparable, and a rebuild keeps only the current model's.
    Column("model", String(128), nullable=False),
    Column("dim", Integer, nullable=False),
    Column("n_slices", Integer, nullable=False),
    # float32 little-endian, dim values, L2-normalised.
    Column("vector", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Modality and body region of the study ("MR-HEAD", models.vector_index.partition_key): similar studies are
    # searched within one partition. Migration 0008; "" for rows written before it.
    Column("index_partition", String(64), nullable=False, server_default=""),
    Index("ix_slice_embeddings_model_level", "model", "series_instance_uid"),
    Index("ix_slice_embeddings_partition", "model", "index_partition", "series_instance_uid"),
)
