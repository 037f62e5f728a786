"""The audit log's tables: who used the HTTP API for what, and which studies each request showed or changed.

One ``audit_log`` row per request (including refused ones: a 401 or 403 is an event worth keeping), one
``audit_studies`` row per study whose data the request returned or changed. Declared on the shared metadata so
that the migrations and the schema test see them. Nothing here holds patient names or IDs: studies are named
by their Study Instance UID, people by the name of their API token.
"""
from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, ForeignKey, Integer, String, Table, Text

from pacs_bridge.schema import UID, metadata

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    # The token's name (api.tokens[].name); NULL when the request carried no valid token.
    Column("principal", String(128), index=True),
    Column("role", String(32)),
    Column("method", String(16), nullable=False),
    Column("path", Text, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("client", String(64)),
    # read (GET/HEAD), change (any other method), denied (401/403).
    Column("action", String(16), nullable=False),
)

audit_studies = Table(
    "audit_studies",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("audit_id", BigInteger().with_variant(Integer, "sqlite"),
           ForeignKey("audit_log.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("study_instance_uid", UID, nullable=False, index=True),
)
