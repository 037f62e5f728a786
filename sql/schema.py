"""The bookkeeping database's tables (SQLAlchemy Core): studies, series, instances, runs, predictions, deliveries
and events, and, imported here, every other area's tables, so that ``metadata`` from this module is the whole
database (migrations, the schema test).

The migrations under ``sql/migrations`` create exactly these tables (a test compares them); change both
together. Timestamps are stored in UTC. No table holds patient names or IDs: the study's demographic
attributes needed for fairness analysis (sex, age) are kept, identifiers are not.
"""
from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# Each area's tables are declared on the same metadata in a module of their own; importing them here makes
# ``metadata`` complete for whoever imports it from this module.
from sql import (  # noqa: F401
    audit_schema,
    fairness_schema,
    feedback_schema,
    pull_schema,
    registry_schema,
    report_schema,
    slice_index_schema,
)
from sql.base import UID, as_utc, metadata, utcnow  # noqa: F401

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_instance_uid", UID, nullable=False, unique=True),
    Column("accession_number", String(64)),
    Column("study_description", String(128)),
    Column("modalities", String(64)),
    Column("patient_sex", String(16)),
    Column("patient_age", String(16)),
    Column("study_date", String(8)),
    Column("calling_aet", String(16)),
    # receiving -> queued -> processing -> done | failed | ignored; late images send it back to receiving.
    Column("status", String(16), nullable=False, default="receiving"),
    # Incremented each time images arrive after the study was dispatched: each version gets its own run and SR.
    Column("version", Integer, nullable=False, default=1),
    Column("pipeline", String(32)),
    Column("instance_count", Integer, nullable=False, default=0),
    Column("first_received_at", DateTime(timezone=True), nullable=False),
    Column("last_received_at", DateTime(timezone=True), nullable=False),
    Column("dispatched_at", DateTime(timezone=True)),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("series_instance_uid", UID, nullable=False, unique=True),
    Column("modality", String(16)),
    Column("series_description", String(128)),
    Column("series_number", Integer),
    Column("instance_count", Integer, nullable=False, default=0),
    # How the series arrived (routing rules test these): the first instance's sender and transport.
    Column("calling_aet", String(16)),
    Column("called_aet", String(16)),
    Column("peer_address", String(64)),
    # c-store | stow-rs | c-get | wado-rs
    Column("source", String(16)),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("sop_instance_uid", UID, nullable=False, unique=True),
    Column("sop_class_uid", UID, nullable=False),
    Column("transfer_syntax_uid", UID),
    Column("path", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("calling_aet", String(16)),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

processing_runs = Table(
    "processing_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("study_version", Integer, nullable=False),
    Column("pipeline", String(32), nullable=False),
    # queued -> running -> done | failed
    Column("status", String(16), nullable=False, default="queued"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker_host", String(128)),
    Column("model_name", String(64)),
    Column("model_version", String(128)),
    Column("error", Text),
    # Every step's timestamp: the turnaround and where the time went.
    Column("last_image_at", DateTime(timezone=True)),
    Column("queued_at", DateTime(timezone=True)),
    Column("started_at", DateTime(timezone=True)),
    Column("loaded_at", DateTime(timezone=True)),
    Column("inferred_at", DateTime(timezone=True)),
    Column("sr_created_at", DateTime(timezone=True)),
    Column("delivered_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("timings", JSON),
    Column("priority", String(16)),
    Column("sr_sop_instance_uid", UID),
    Column("sr_path", Text),
    # The routing decision the run was created by: lane (urgent | routine), rule, and forwards after processing.
    Column("lane", String(16)),
    Column("routing", JSON),
    # One run per study version: a re-sent study or a redelivered task never makes a second one.
    UniqueConstraint("study_id", "study_version", name="uq_run_study_version"),
)

predictions = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("processing_runs.id", ondelete="CASCADE"), nullable=False, index=True),
    # diagnosis | priority | referral
    Column("kind", String(16), nullable=False),
    Column("label", String(96), nullable=False),
    Column("probability", Float, nullable=False),
    Column("threshold", Float),
    Column("reported", Integer, nullable=False, default=0),
    UniqueConstraint("run_id", "kind", "label", name="uq_prediction"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    # An SR delivery belongs to a run; a forward of the study's images (kind "images") to a study version.
    Column("run_id", Integer, ForeignKey("processing_runs.id", ondelete="CASCADE"), index=True),
    Column("destination", String(64), nullable=False),
    # sr: the run's SR (path); images: the study's images as received (files), forwarded by a routing rule.
    Column("kind", String(16), nullable=False, default="sr", server_default="sr"),
    # images only: before | after processing.
    Column("stage", String(16)),
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="CASCADE"), index=True),
    Column("study_version", Integer),
    Column("sop_instance_uid", UID),
    # The SR, or the study's folder for a set of images.
    Column("path", Text, nullable=False),
    Column("files", JSON),
    # When the delivery was handed to the delivery queue (forwards on routing are queued by the assembler).
    Column("queued_at", DateTime(timezone=True)),
    # pending -> delivered | failed (dead letter)
    Column("status", String(16), nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
    UniqueConstraint("run_id", "destination", name="uq_delivery"),
    UniqueConstraint("study_id", "study_version", "destination", "kind", name="uq_delivery_files"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    # received | quarantine | completion | routing | forward | dispatch | error | delivery | pull
    Column("kind", String(32), nullable=False, index=True),
    Column("study_instance_uid", String(128)),
    Column("sop_instance_uid", String(128)),
    Column("reason", Text, nullable=False),
    Column("detail", JSON),
)
