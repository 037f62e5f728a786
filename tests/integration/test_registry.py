"""The model registry on a real PostgreSQL database: register, promote, roll back, and the command line."""
from __future__ import annotations

import json

import pytest

from models.bundle import random_bundle, save_bundle
from sql import model_registry
from train import registry
from worker.cli import main as triage


def _bundle(folder, seed: int, version: str):
    bundle = random_bundle("tiny", seed=seed, version=version)
    return save_bundle(folder / version, bundle.vqvae, bundle.prima, bundle.manifest)


def test_rollback_restores_the_version_that_served_before(engine, tmp_path):
    for seed, version in enumerate(("alpha", "beta", "gamma")):
        registry.register_bundle(engine, _bundle(tmp_path, seed, version))
    assert model_registry.serving_version(engine) is None  # nothing promoted: workers use model.bundle
    for version in ("alpha", "beta", "gamma"):
        registry.promote(engine, version, actor="test", reason="test")
    assert model_registry.serving_version(engine).version == "gamma"

    assert registry.rollback(engine, actor="test", reason="bad night").version == "beta"
    assert model_registry.get_version(engine, "gamma").status == model_registry.RETIRED
    assert registry.rollback(engine, actor="test", reason="again").version == "alpha"
    with pytest.raises(registry.RegistryError, match="nothing to roll back to"):
        registry.rollback(engine, actor="test", reason="once more")
    registry.promote(engine, "gamma", actor="test", reason="fixed after all")
    assert model_registry.serving_version(engine).version == "gamma"
    assert registry.rollback(engine, actor="test", reason="no").version == "alpha"


def test_a_version_that_failed_its_gates_is_promoted_only_by_force(engine, tmp_path):
    registry.register_bundle(engine, _bundle(tmp_path, 0, "good"))
    registry.register_bundle(engine, _bundle(tmp_path, 1, "worse"),
                             gates={"mean_auroc": {"passed": False, "reason": "0.61 vs 0.90"}})
    registry.set_status(engine, "worse", model_registry.REJECTED)
    registry.promote(engine, "good", actor="test", reason="baseline")
    with pytest.raises(registry.RegistryError, match="mean_auroc"):
        registry.promote(engine, "worse", actor="test", reason="try")
    assert model_registry.serving_version(engine).version == "good"
    registry.promote(engine, "worse", actor="test", reason="override by the governance board", force=True)
    assert model_registry.serving_version(engine).version == "worse"


def test_registering_the_same_version_from_another_folder_is_refused(engine, tmp_path):
    first = _bundle(tmp_path / "a", 0, "same")
    registry.register_bundle(engine, first)
    assert registry.register_bundle(engine, first).version == "same"  # idempotent
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register_bundle(engine, _bundle(tmp_path / "b", 1, "same"))


def test_models_command_lists_promotes_and_rolls_back(engine, postgres_url, tmp_path, capsys):
    assert triage(["models", "register", str(_bundle(tmp_path, 0, "v1")), "--url", postgres_url]) == 0
    assert triage(["models", "register", str(_bundle(tmp_path, 1, "v2")), "--url", postgres_url]) == 0
    assert triage(["models", "promote", "v1", "--url", postgres_url]) == 0
    assert triage(["models", "promote", "v2", "--url", postgres_url, "--reason", "better"]) == 0
    capsys.readouterr()

    assert triage(["models", "list", "--json", "--url", postgres_url]) == 0
    listed = {v["version"]: v for v in json.loads(capsys.readouterr().out)}
    assert listed["v2"]["serving"] and not listed["v1"]["serving"]

    assert triage(["models", "rollback", "--url", postgres_url]) == 0
    assert "v1 serves again" in capsys.readouterr().out
    assert triage(["models", "promote", "v9", "--url", postgres_url]) == 1
    assert "no model version 'v9'" in capsys.readouterr().out
    assert triage(["models", "list", "--url", postgres_url]) == 0
    assert "v1" in capsys.readouterr().out
