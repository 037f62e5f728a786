"""The packages import one way (DESIGN.md, "Imports run one way"): the import-linter contracts in pyproject.toml
hold for the checkout, and they catch an import that goes the wrong way."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pacs_bridge", "worker", "train", "models", "sql")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root``, with the contracts of ``root/pyproject.toml``."""
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [shutil.which("lint-imports") or "lint-imports"]
    # Only root's packages on the path: the checkout's must not stand in for a copy.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([*command, "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_checkout_keeps_every_import_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_train_module_importing_worker_breaks_the_layers_contract_naming_the_import(tmp_path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pt", "*.safetensors"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "train" / "planted.py").write_text('"""An import the wrong way."""\nfrom worker.config import '
                                                   'load_settings  # noqa: F401\n')

    result = lint_imports(tmp_path)

    assert result.returncode != 0
    assert "train is not allowed to import worker" in result.stdout
    assert "train.planted -> worker.config" in result.stdout
