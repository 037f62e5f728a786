"""The model registry: which bundles exist, how each was evaluated, which one serves, and how it got there.

Every bundle the training makes is registered as a ``model_versions`` row with its metrics and gate results.
Promotions and rollbacks are appended to ``model_promotions``; the serving version is found by replaying that
log like a stack (a promotion pushes a version, a rollback pops the serving one), so a rollback always restores
the version that served before the one rolled back, however often that happens. Workers ask
:func:`serving_version` before each run and load a new bundle when the answer changes (no restart).

Command line: ``triage models list | promote VERSION | rollback | register BUNDLE | install PATH``
(:mod:`train.model_install`).
"""
from __future__ import annotations

import argparse
import json
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
    list_versions,
    serving_stack,
    serving_version,
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


# --- command line ---------------------------------------------------------------------------------------------


def _engine(args: argparse.Namespace) -> Engine:
    from sql.database import make_engine
    from worker.config import load_settings

    settings = load_settings(args.config)
    return make_engine(args.url or settings.database_url)


def _summary(version: ModelVersion) -> str:
    metrics = version.metrics or {}
    candidate = metrics.get("candidate", metrics)
    auroc = candidate.get("mean_auroc")
    return "" if auroc is None else f"{auroc:.3f}"


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    engine = _engine(args)
    serving = serving_version(engine)
    versions = list_versions(engine)
    if args.json:
        print(json.dumps([{**{k: v for k, v in vars(v).items() if k != "created_at"},
                           "created_at": v.created_at.isoformat(),
                           "serving": serving is not None and v.id == serving.id} for v in versions]))
        return 0
    table = Table("", "status", "created", "mean AUROC", "gates")
    table.add_column("version", overflow="fold")
    table.add_column("parent", overflow="fold")
    for v in versions:
        failed = [n for n, g in (v.gates or {}).items() if not g.get("passed", True)]
        gates = "" if not v.gates else ("passed" if not failed else "failed: " + ", ".join(failed))
        table.add_row("*" if serving is not None and v.id == serving.id else "", v.status,
                      v.created_at.strftime("%Y-%m-%d %H:%M"), _summary(v), gates, v.version, v.parent_version or "")
    Console().print(table)
    if serving is None:
        print("no version promoted: workers use the configured model.bundle")
    return 0


def _promote(args: argparse.Namespace) -> int:
    try:
        version = promote(_engine(args), args.version, actor="cli", reason=args.reason, force=args.force)
    except RegistryError as error:
        print(f"triage models promote: {error}")
        return 1
    print(f"{version.version} now serves ({version.bundle_path})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    try:
        version = rollback(_engine(args), actor="cli", reason=args.reason)
    except RegistryError as error:
        print(f"triage models rollback: {error}")
        return 1
    print(f"rolled back: {version.version} serves again ({version.bundle_path})")
    return 0


def _register(args: argparse.Namespace) -> int:
    version = register_bundle(_engine(args), args.bundle, notes=args.notes)
    print(f"registered {version.version} ({version.status}) from {version.bundle_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``triage models ...``."""
    models = subparsers.add_parser("models", help="model registry: list, promote, roll back, register, install")
    sub = models.add_subparsers(dest="models_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="database URL (default: from the configuration)")

    p = sub.add_parser("list", parents=[common], help="every registered version; * marks the serving one")
    p.add_argument("--json", action="store_true", help="print the versions as JSON")
    p.set_defaults(func=_list)
    p = sub.add_parser("promote", parents=[common], help="make a version serve (workers switch at their next run)")
    p.add_argument("version")
    p.add_argument("--reason", default="promoted by an operator")
    p.add_argument("--force", action="store_true", help="promote even though its gates failed")
    p.set_defaults(func=_promote)
    p = sub.add_parser("rollback", parents=[common], help="serve again the version that served before")
    p.add_argument("--reason", default="rolled back by an operator")
    p.set_defaults(func=_rollback)
    p = sub.add_parser("register", parents=[common], help="register a bundle folder as a candidate")
    p.add_argument("bundle")
    p.add_argument("--notes")
    p.set_defaults(func=_register)

    from train.model_install import add_install_parser

    add_install_parser(sub, common)
