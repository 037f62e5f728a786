"""What every table module shares: the one ``MetaData``, the UID column type and the UTC timestamp helpers.

Table modules declare their tables on :data:`metadata`; import it from :mod:`sql.schema` (which imports every
table module) where the whole database must be seen.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import MetaData, String

metadata = MetaData()

UID = String(64)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """A timestamp read back from the database, made timezone-aware: SQLite returns naive datetimes for
    timezone-aware columns, and everything stored here is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
