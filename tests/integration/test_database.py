"""`triage db upgrade` on empty SQLite and PostgreSQL databases, and migrations that match the declared schema."""
from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from sql.database import alembic_config, make_engine, upgrade
from sql.schema import metadata

EXPECTED_TABLES = {"studies", "series", "instances", "processing_runs", "predictions", "deliveries", "events"}


def _triage(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _assert_schema_matches(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            assert EXPECTED_TABLES <= set(inspect(connection).get_table_names())
            differences = compare_metadata(MigrationContext.configure(connection), metadata)
            assert differences == [], f"migrations and sql/schema.py disagree: {differences}"
    finally:
        engine.dispose()


def test_db_upgrade_command_creates_schema_in_empty_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'triage.db'}"
    result = _triage("db", "upgrade", "--url", url)
    assert result.returncode == 0, result.stderr
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert f"revision {head}" in result.stdout
    _assert_schema_matches(url)


def test_db_upgrade_command_creates_schema_in_empty_postgres(postgres_url):
    result = _triage("db", "upgrade", "--url", postgres_url)
    assert result.returncode == 0, result.stderr
    _assert_schema_matches(postgres_url)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_twice_is_harmless(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 't.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    upgrade(url)
    _assert_schema_matches(url)
