"""Configuration: embedded defaults, the YAML file, environment overrides, and refusal of unknown keys."""
from __future__ import annotations

import pytest

from worker.config import load_settings


def test_defaults_need_no_server(tmp_path):
    settings = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path / 'triage.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings["destinations"] == []
    assert settings.outbox_dir == tmp_path / "outbox"


def test_file_then_environment_override(tmp_path):
    config = tmp_path / "triage.yaml"
    config.write_text("scp:\n  port: 4242\n  allowed_calling_aets: [MR1]\nassembly:\n  quiet_period_s: 3\n")
    settings = load_settings(config, environ={"TRIAGE_SCP__PORT": "5151", "TRIAGE_DATABASE__URL": "postgresql://x/y"})
    assert settings["scp"]["port"] == 5151  # the environment wins, typed as YAML
    assert settings["scp"]["allowed_calling_aets"] == ["MR1"]
    assert settings["assembly"]["quiet_period_s"] == 3
    assert settings["assembly"]["max_wait_s"] == 900.0  # untouched default
    assert settings.database_url == "postgresql://x/y"


def test_unknown_key_is_refused_with_its_name(tmp_path):
    config = tmp_path / "triage.yaml"
    config.write_text("scp:\n  prot: 4242\n")
    with pytest.raises(KeyError, match="scp.'prot'|'prot'"):
        load_settings(config, environ={})


def test_device_uid_is_stable_per_deployment(tmp_path):
    a = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path)}).device_uid
    b = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path)}).device_uid
    c = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path / "other")}).device_uid
    assert a == b != c


def test_environment_variables_outside_the_configuration_are_left_alone_but_typos_inside_are_refused(tmp_path):
    settings = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path), "TRIAGE_TEST_POSTGRES": "postgresql://x"})
    assert settings.var_dir == tmp_path
    with pytest.raises(KeyError, match="prot"):
        load_settings(environ={"TRIAGE_SCP__PROT": "1"})
