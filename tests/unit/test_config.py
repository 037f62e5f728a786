"""Configuration: embedded defaults, the YAML file, environment overrides, typed values, refusal of unknown keys."""
from __future__ import annotations

import pytest

from pacs_bridge.scp import ScpSettings
from worker.config import ConfigurationError, load_settings


def test_defaults_need_no_server(tmp_path):
    settings = load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path / 'triage.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.destinations == []
    assert settings.outbox_dir == tmp_path / "outbox"


def test_file_then_environment_override(tmp_path):
    config = tmp_path / "triage.yaml"
    config.write_text("scp:\n  port: 4242\n  allowed_calling_aets: [MR1]\nassembly:\n  quiet_period_s: 3\n")
    settings = load_settings(config, environ={"TRIAGE_SCP__PORT": "5151", "TRIAGE_DATABASE__URL": "postgresql://x/y"})
    assert settings.scp.port == 5151  # the environment wins, typed as YAML
    assert settings.scp.allowed_calling_aets == ["MR1"]
    assert settings.assembly.quiet_period_s == 3
    assert settings.assembly.max_wait_s == 900.0  # untouched default
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


def test_a_value_of_the_wrong_type_fails_at_load_naming_the_key(tmp_path):
    config = tmp_path / "triage.yaml"
    config.write_text("scp:\n  port: eleven\n")
    with pytest.raises(ConfigurationError, match=r"scp\.port: Input should be a valid integer"):
        load_settings(config, environ={})
    with pytest.raises(ConfigurationError, match=r"worker\.batch_size: Input should be a valid integer"):
        load_settings(environ={"TRIAGE_WORKER__BATCH_SIZE": "many"})


def test_a_secret_is_read_from_the_file_a_FILE_variable_names(tmp_path):
    secret = tmp_path / "db-url"
    secret.write_text("postgresql://triage:s3cret@db/triage\n")
    settings = load_settings(environ={"TRIAGE_DATABASE__URL_FILE": str(secret), "TRIAGE_API__OIDC__JWKS_FILE": "/k"})
    assert settings.database_url == "postgresql://triage:s3cret@db/triage"
    assert settings.api.oidc.jwks_file == "/k"  # a key that itself ends in _file keeps its meaning


def test_setting_one_key_of_a_mapping_keeps_the_defaults_of_the_others(tmp_path):
    config = tmp_path / "triage.yaml"
    config.write_text("model:\n  priority_map: {high: urgent}\nscp:\n  tls: {cert: c.pem, key: k.pem}\n")
    settings = load_settings(config, environ={"TRIAGE_PUBLISHING__SCALES__HL7V2__LEVELS__STAT": "A"})
    assert settings.model.priority_map == {"none": "routine", "low": "urgent", "medium": "urgent", "high": "urgent"}
    assert settings.publishing.scales["hl7v2"].levels == {"routine": "R", "urgent": "A", "stat": "A"}
    assert settings.scp.tls is not None and settings.scp.tls.require_client_cert  # mutual TLS unless turned off


def test_a_typo_in_a_tls_section_is_refused_even_when_tls_is_off(tmp_path):
    config = tmp_path / "triage.yaml"
    config.write_text("scp:\n  tls: {cret: c.pem}\n")
    with pytest.raises(ConfigurationError, match="scp.tls.*cret"):
        load_settings(config, environ={})


def test_the_receiver_and_the_configuration_share_their_defaults(tmp_path):
    assert load_settings(environ={"TRIAGE_VAR_DIR": str(tmp_path)}).scp == ScpSettings()
    assert ScpSettings().max_object_bytes == 2 * 1024**3
