"""The model registry: which bundles exist, how each was evaluated, which one serves, and how it got there.

Every bundle the training makes is registered as a ``model_versions`` row with its metrics and gate results.
Promotions and rollbacks are appended to ``model_promotions``; the serving version is found by replaying that
log like a stack (a promotion pushes a version, a rollback pops the serving one), so a rollback always restores
the version that served before the one rolled back, however often that happens. Workers ask
:func:`serving_version` before each run and load a new bundle when the answer changes (no restart).

Reads (the serving version, the registered ones) are :mod:`sql.model_registry`; the command line is
``triage models`` (:mod:`worker.commands.models`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from sql.base import utcnow
from sql.model_registry import (
    CANDIDATE,
    PROMOTED,
    REJECTED,
    RETIRED,
    ModelVersion,
    get_version,
    serving_stack,
    version_row,
)
from sql.registry_schema import model_promotions, model_versions

log = logging.getLogger(__name__)

class RegistryError(Exception):
    """A registry operation that cannot be done; the message says why and what to do."""


def register_bundle(
    engine: Engine,
    bundle_path: str | Path,
    *,
    status: str = CANDIDATE,
    parent_version: str | None = None,
    metrics: dict[str, Any] | None = None,
    gates: dict[str, Any] | None = None,
    training_run_id: int | None = None,
    notes: str | None = None,
) -> ModelVersion:
    """Register the bundle in ``bundle_path`` under its manifest's version (verified: checksums and architecture,
    without reading a full-size bundle into memory). A version registered before with the same folder is
    returned as it is; with another folder it is an error."""
    # torch and monai (the encoder's identity is a digest of its weights): kept out of `triage models list`.
    from models.backbone import bundle_backbone_id
    from models.bundle import map_bundle

    folder = Path(bundle_path).resolve()
    bundle = map_bundle(folder)
    version = bundle.version
    with engine.begin() as connection:
        existing = version_row(connection, version)
        if existing is not None:
            if Path(existing.bundle_path) != folder:
                raise RegistryError(
                    f"version {version} is already registered for {existing.bundle_path}, not {folder}; "
                    "give the new bundle a version of its own"
                )
            return existing
        connection.execute(insert(model_versions).values(
            version=version, bundle_path=str(folder), family=bundle.manifest.get("family"),
            config=bundle.manifest.get("config"), backbone_id=bundle_backbone_id(bundle),
            parent_version=parent_version or bundle.manifest.get("parent_version"), status=status,
            metrics=metrics, gates=gates, training_run_id=training_run_id, created_at=utcnow(),
            notes=notes if notes is not None else bundle.manifest.get("notes"),
        ))
        return version_row(connection, version)  # type: ignore[return-value]


def set_status(engine: Engine, version: str, status: str, gates: dict | None = None,
               metrics: dict | None = None) -> None:
    values: dict[str, Any] = {"status": status}
    if gates is not None:
        values["gates"] = gates
    if metrics is not None:
        values["metrics"] = metrics
    with engine.begin() as connection:
        connection.execute(update(model_versions).where(model_versions.c.version == version).values(**values))


def promote(engine: Engine, version: str, actor: str, reason: str, force: bool = False) -> ModelVersion:
    """Make ``version`` the serving model. A rejected version needs ``force`` (an operator overriding the
    gates, with a reason)."""
    with engine.begin() as connection:
        target = version_row(connection, version)
        if target is None:
            raise RegistryError(f"no model version {version!r}; see `triage models list`")
        if target.status == REJECTED and not force:
            raise RegistryError(f"{version} failed its gates ({_failed_gates(target)}); use --force to override")
        stack = serving_stack(connection)
        if stack and stack[-1] == target.id:
            raise RegistryError(f"{version} is already serving")
        if not Path(target.bundle_path).exists():
            raise RegistryError(f"{version}: bundle folder {target.bundle_path} does not exist (any more)")
        connection.execute(insert(model_promotions).values(
            model_version_id=target.id, action="promote", at=utcnow(), actor=actor, reason=reason))
        connection.execute(update(model_versions).where(model_versions.c.id == target.id).values(status=PROMOTED))
    log.info("model %s promoted by %s: %s", version, actor, reason)
    return _reread(engine, version)


def rollback(engine: Engine, actor: str, reason: str) -> ModelVersion:
    """Stop serving the current version and serve again the one that served before it."""
    with engine.begin() as connection:
        stack = serving_stack(connection)
        if len(stack) < 2:
            raise RegistryError("nothing to roll back to: fewer than two versions have served")
        current_id, previous_id = stack[-1], stack[-2]
        connection.execute(insert(model_promotions).values(
            model_version_id=previous_id, action="rollback", at=utcnow(), actor=actor, reason=reason))
        connection.execute(update(model_versions).where(model_versions.c.id == current_id).values(status=RETIRED))
        previous = connection.execute(select(model_versions.c.version).where(model_versions.c.id == previous_id))
        version = previous.scalar_one()
    log.info("rolled back to model %s by %s: %s", version, actor, reason)
    return _reread(engine, version)


def _reread(engine: Engine, version: str) -> ModelVersion:
    found = get_version(engine, version)
    assert found is not None
    return found


def _failed_gates(version: ModelVersion) -> str:
    failed = [name for name, gate in (version.gates or {}).items() if not gate.get("passed", True)]
    return ", ".join(failed) or "no gate recorded"
