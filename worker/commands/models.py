"""``triage models list | promote VERSION | rollback | register BUNDLE | install PATH``: the model registry
(:mod:`train.registry`, read through :mod:`sql.model_registry`) and installing official weights or a bundle
(:mod:`train.model_install`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine

from sql.database import make_engine
from sql.model_registry import ModelVersion, list_versions, serving_version
from train.model_install import InstallError, install
from train.registry import RegistryError, promote, register_bundle, rollback
from worker.commands.train_settings import nightly_config
from worker.config import load_settings


def _engine(args: argparse.Namespace) -> Engine:
    settings = load_settings(args.config)
    return make_engine(args.url or settings.database_url)


def _summary(version: ModelVersion) -> str:
    metrics = version.metrics or {}
    candidate = metrics.get("candidate", metrics)
    auroc = candidate.get("mean_auroc")
    return "" if auroc is None else f"{auroc:.3f}"


def _list(args: argparse.Namespace) -> int:
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
    add_install_parser(sub, common)


def _install_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    models_dir = Path(args.models_dir) if args.models_dir else nightly_config(settings).models_dir
    engine = make_engine(args.url or settings.database_url)
    try:
        outcome = install(engine, args.path, models_dir, vqvae=args.vqvae, version=args.version,
                          sha256=args.sha256, vqvae_sha256=args.vqvae_sha256, promote=args.promote,
                          slice_config=args.slice_config)
    except InstallError as error:
        print(f"triage models install: {error}")
        return 1
    finally:
        engine.dispose()
    if outcome.version is not None:
        state = "promoted: it serves now" if outcome.promoted else "registered as a candidate (`triage models promote`)"
        print(f"installed {outcome.version} at {outcome.path}; {state}")
    else:
        print(f"installed MedImageInsight weights at {outcome.path}; set in the configuration:\n{outcome.setting}")
    return 0


def add_install_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``triage models install PATH`` (called by :func:`register`)."""
    p = sub.add_parser("install", parents=[common],
                       help="install official weights (Prima, MedImageInsight) or a bundle folder, verified")
    p.add_argument("path", help="a bundle folder, primafullmodel107.pt (with --vqvae) or medimageinsigt-v1.0.0.pt")
    p.add_argument("--vqvae", help="Prima's VQ-VAE checkpoint (vqvae_model_step16799.pth)")
    p.add_argument("--version", help="registry version of an installed Prima checkpoint (default: prima-107)")
    p.add_argument("--sha256", help="expected sha256 of PATH (a file)")
    p.add_argument("--vqvae-sha256", help="expected sha256 of the --vqvae file")
    p.add_argument("--models-dir", help="where models are installed (default: training.models_dir)")
    p.add_argument("--promote", action=argparse.BooleanOptionalAction, default=None,
                   help="serve it now (default: only when no model serves yet)")
    p.add_argument("--slice-config", default="full", choices=("full", "tiny"),
                   help="MedImageInsight network the weights must fit (tiny: tests and demos)")
    p.set_defaults(func=_install_command)
