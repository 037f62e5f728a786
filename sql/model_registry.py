"""Reading the model registry: the registered versions and the one that serves now.

Workers ask :func:`serving_version` before each run and load a new bundle when the answer changes (no restart);
the training and the command line write the registry (:mod:`train.registry`). The serving version is found by
replaying the ``model_promotions`` log like a stack: a promotion pushes a version, a rollback pops it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from sql.registry_schema import model_promotions, model_versions

CANDIDATE, PROMOTED, REJECTED, RETIRED = "candidate", "promoted", "rejected", "retired"


@dataclass(frozen=True)
class ModelVersion:
    id: int
    version: str
    bundle_path: str
    status: str
    family: str | None
    config: str | None
    backbone_id: str | None
    parent_version: str | None
    metrics: dict[str, Any] | None
    gates: dict[str, Any] | None
    created_at: datetime
    notes: str | None

    @classmethod
    def from_row(cls, row: Any) -> ModelVersion:
        return cls(row.id, row.version, row.bundle_path, row.status, row.family, row.config, row.backbone_id,
                   row.parent_version, row.metrics, row.gates, row.created_at, row.notes)


def version_row(connection: Connection, version: str) -> ModelVersion | None:
    row = connection.execute(select(model_versions).where(model_versions.c.version == version)).first()
    return None if row is None else ModelVersion.from_row(row)


def get_version(engine: Engine, version: str) -> ModelVersion | None:
    with engine.connect() as connection:
        return version_row(connection, version)


def list_versions(engine: Engine) -> list[ModelVersion]:
    with engine.connect() as connection:
        rows = connection.execute(select(model_versions).order_by(model_versions.c.id)).all()
    return [ModelVersion.from_row(r) for r in rows]


def serving_stack(connection: Connection) -> list[int]:
    """Model version ids of the serving history, oldest first; the last one serves."""
    stack: list[int] = []
    rows = connection.execute(
        select(model_promotions.c.action, model_promotions.c.model_version_id).order_by(model_promotions.c.id)
    ).all()
    for action, version_id in rows:
        if action == "promote":
            stack.append(version_id)
        elif action == "rollback" and stack:
            stack.pop()
    return stack


def serving_version(engine: Engine) -> ModelVersion | None:
    """The version that serves now, or None when nothing was ever promoted (workers then use the configured
    bundle)."""
    with engine.connect() as connection:
        stack = serving_stack(connection)
        if not stack:
            return None
        row = connection.execute(select(model_versions).where(model_versions.c.id == stack[-1])).first()
    return None if row is None else ModelVersion.from_row(row)
