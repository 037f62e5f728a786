"""PostgreSQL and Redis for the tests: a fresh database (or Redis database number) per test on the servers
that ops/services.sh runs on loopback. Where a server is not reachable the fixture fails with that message,
once per test, instead of a connection error deep in the code under test."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

POSTGRES_ADMIN_URL = os.environ.get("TRIAGE_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TRIAGE_TEST_REDIS", "redis://127.0.0.1:6379")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"triage_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # pragma: no cover - reported clearly rather than as a confusing failure
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not usable: {exc}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as c:
        c.exec_driver_sql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    admin.dispose()


@pytest.fixture
def engine(postgres_url):
    """An engine on a fresh, migrated PostgreSQL database (``postgres_url``), disposed of afterwards."""
    from sql.database import make_engine, upgrade

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def bookkeeping_url(request, tmp_path) -> str:
    """A migrated database, once on SQLite and once on PostgreSQL: every test that writes bookkeeping runs on both
    (SQLite does not enforce column widths)."""
    from sql.database import upgrade

    url = (f"sqlite:///{tmp_path / 'triage.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    upgrade(url)
    return url


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database number of its own, emptied before and after the test."""
    import redis

    db = 8 + secrets.randbelow(7)
    client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not usable: {exc}")
    yield f"{REDIS_URL}/{db}"
    client.flushdb()
