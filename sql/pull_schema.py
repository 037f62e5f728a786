"""Tables for retrieving studies from a PACS (SQLAlchemy Core): one row per pull job, one per study in it.

They share ``sql.base.metadata`` (``sql.schema`` imports this module); migration ``0004``
creates them. A job's studies are listed before any is retrieved, and each study's state is committed as it
changes, so an interrupted job resumes where it stopped and never retrieves a finished study again.
"""
from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, ForeignKey, Integer, String, Table, Text, UniqueConstraint

from sql.base import UID, metadata

pull_jobs = Table(
    "pull_jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    # pull (one study, `triage pull`) | backfill (a date range, `triage backfill`)
    Column("kind", String(16), nullable=False),
    # cmove | cget | wado
    Column("via", String(16), nullable=False),
    Column("source", String(64), nullable=False),
    # What was asked for: {"study": uid} or {"from": date, "to": date, "modalities": [...]}.
    Column("query", JSON, nullable=False),
    # running -> done | interrupted | failed (some studies could not be retrieved)
    Column("status", String(16), nullable=False, default="running"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # When the query phase finished: the job's list of studies is complete from then on.
    Column("queried_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("error", Text),
)

pull_items = Table(
    "pull_items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("pull_jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("study_instance_uid", UID, nullable=False, index=True),
    Column("study_date", String(8)),
    Column("modalities", String(64)),
    # NumberOfStudyRelatedInstances as the PACS reported it, when it did.
    Column("expected_instances", Integer),
    # pending -> retrieving -> done | failed | skipped (already held)
    Column("status", String(16), nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("instances_received", Integer),
    Column("error", Text),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    UniqueConstraint("job_id", "study_instance_uid", name="uq_pull_item"),
)
