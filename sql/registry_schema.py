"""The model registry and training bookkeeping tables (written by ``train/``, read by the worker).

- ``model_versions``: every bundle the training made or an operator registered, with its evaluation metrics and
  gate results; ``status`` is candidate (registered, not decided), promoted (has served), rejected (a gate
  failed) or retired.
- ``model_promotions``: the log of promotions and rollbacks; replaying it gives the serving version (the latest
  promotion not rolled back), so a rollback restores exactly the version that served before.
- ``training_runs``: one row per training job (nightly or manual), with its window of data, seed, the model it
  started from, the candidate it produced and the decision; ``training_metrics``: the metrics each loop logs.
- ``study_embeddings``: study embeddings (float32 bytes) per study and study-encoder identity (``backbone_id``),
  from which the heads are retrained without running the encoder again.

Declared on the shared metadata (``sql.schema`` imports this module) so that migration ``0003`` and the
schema test see them. Nothing here holds patient names or identifiers. No torch: the DICOM edge imports this.
"""
from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from sql.base import UID, metadata

training_runs = Table(
    "training_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    # nightly | heads | phantoms
    Column("kind", String(32), nullable=False),
    # running | done | skipped | failed | interrupted
    Column("status", String(16), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("seed", Integer, nullable=False),
    # Ground truth recorded after ``since`` and up to ``until`` is this run's new data.
    Column("since", DateTime(timezone=True)),
    Column("until", DateTime(timezone=True)),
    Column("base_version", String(128)),
    Column("candidate_version", String(128)),
    # promoted | rejected | none
    Column("decision", String(16)),
    Column("n_new_studies", Integer),
    Column("n_train", Integer),
    Column("n_held_out", Integer),
    Column("checkpoint", Text),
    Column("parameters", JSON),
    Column("result", JSON),
    Column("error", Text),
)

training_metrics = Table(
    "training_metrics",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("training_runs.id", ondelete="CASCADE"), nullable=False, index=True),
    # the loop: vqvae | clip | heads | evaluation
    Column("stage", String(32), nullable=False),
    Column("step", Integer, nullable=False),
    Column("name", String(96), nullable=False),
    Column("value", Float),
    Column("at", DateTime(timezone=True), nullable=False),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", String(128), nullable=False, unique=True),
    # The bundle folder; every worker must be able to read it (shared storage).
    Column("bundle_path", Text, nullable=False),
    Column("family", String(32)),
    Column("config", String(32)),
    Column("backbone_id", String(64)),
    # The version this one was trained from (its heads' starting point), if any.
    Column("parent_version", String(128)),
    # candidate | promoted | rejected | retired
    Column("status", String(16), nullable=False),
    Column("metrics", JSON),
    # {gate: {"passed": bool, "value": ..., "limit": ..., "reason": str}}
    Column("gates", JSON),
    Column("training_run_id", Integer, ForeignKey("training_runs.id", ondelete="SET NULL")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("notes", Text),
)

model_promotions = Table(
    "model_promotions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model_version_id", Integer, ForeignKey("model_versions.id", ondelete="CASCADE"), nullable=False,
           index=True),
    # promote | rollback (the row of a rollback names the version that serves after it)
    Column("action", String(16), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    # nightly | cli | configuration
    Column("actor", String(64), nullable=False),
    Column("reason", Text),
)

study_embeddings = Table(
    "study_embeddings",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_instance_uid", UID, nullable=False),
    Column("backbone_id", String(64), nullable=False, index=True),
    Column("model_version", String(128)),
    Column("dim", Integer, nullable=False),
    # little-endian float32
    Column("vector", LargeBinary, nullable=False),
    # worker | nightly
    Column("source", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("study_instance_uid", "backbone_id", name="uq_study_embedding"),
)
