"""The suite's fixtures and markers.

Fixtures: a fresh PostgreSQL database or Redis database number per test (tests.support.databases), one Orthanc
for the session (tests.support.orthanc), a tiny random model bundle, and `cpu_stress`.

Markers: each test is marked with the services it uses (`needs_postgres`, `needs_redis`, `needs_orthanc`,
`needs_dcmtk`, `needs_chromium`), from the fixtures it asks for; a test that runs a tool itself (storescu,
dciodvfy) carries the marker explicitly. Tests under tests/unit must carry none: that is checked at
collection, so `ops/test.sh tests/unit` stays runnable with no service at all."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.databases import bookkeeping_url, engine, postgres_url, redis_url  # noqa: F401 (fixtures)
from tests.support.orthanc import orthanc, orthanc_server  # noqa: F401 (fixtures)
from tests.support.processes import install_reaper, stop_all
from tests.support.stress import cpu_stress_fixture as cpu_stress  # noqa: F401  (a fixture for every test module)

UNIT = Path(__file__).resolve().parent / "unit"

#: Fixture name -> the service marker a test that uses it gets.
SERVICE_FIXTURES = {
    "postgres_url": "needs_postgres",
    "redis_url": "needs_redis",
    "orthanc": "needs_orthanc",
    "orthanc_server": "needs_orthanc",
    "chromium": "needs_chromium",
}
SERVICE_MARKERS = ("needs_postgres", "needs_redis", "needs_orthanc", "needs_dcmtk", "needs_chromium")


def pytest_configure(config: pytest.Config) -> None:
    install_reaper()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_all()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misplaced = []
    for item in items:
        for fixture, marker in SERVICE_FIXTURES.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)
        # Fixtures run once on SQLite and once on PostgreSQL (bookkeeping_url, ...) reach postgres_url through
        # getfixturevalue, for their "postgresql" parameter only: item.fixturenames does not show it.
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "postgresql" in callspec.params.values():
            item.add_marker("needs_postgres")
        if Path(str(item.path)).is_relative_to(UNIT):
            used = sorted({m.name for m in item.iter_markers() if m.name in SERVICE_MARKERS})
            if used:
                misplaced.append(f"{item.nodeid}: {', '.join(used)}")
    if misplaced:
        raise pytest.UsageError("tests under tests/unit must need no service (move them to tests/integration)"
                                ":\n  " + "\n  ".join(misplaced))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny Prima bundle with random weights: for tests of the service, where accuracy is not the point."""
    from models.bundle import random_bundle, save_bundle

    folder = tmp_path_factory.mktemp("bundle")
    bundle = random_bundle("tiny", seed=0)
    save_bundle(folder, bundle.vqvae, bundle.prima, bundle.manifest)
    return folder
