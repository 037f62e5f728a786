"""The HTTP API's access tables: who used it for what, which studies each request showed or changed, and the
API tokens every replica accepts.

One ``audit_log`` row per request (including refused ones: a 401 or 403 is an event worth keeping), one
``audit_studies`` row per study whose data the request returned or changed. Declared on the shared metadata so
that the migrations and the schema test see them. Nothing here holds patient names or IDs: studies are named
by their Study Instance UID, people by the name of their API token.
"""
from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from sql.base import UID, metadata

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

#: The static API tokens (``api.tokens``) as every API replica sees them: hashes only, never the tokens. Written
#: from the configuration at start-up and by ``POST /admin/tokens/reload``; a token whose row is missing or
#: revoked is refused by every replica on its next lookup (worker/api/tokens.py).
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    # SHA-256 of the token, hex: the tokens are long random secrets, so a plain digest cannot be reversed.
    Column("token_hash", String(64), nullable=False),
    Column("name", String(128), nullable=False),
    Column("role", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Set when the token left the configuration (removed, rotated, emptied); the row stays as a record.
    Column("revoked_at", DateTime(timezone=True)),
    UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
)
