"""The web API in the test process (FastAPI's TestClient) on a real database, with bearer tokens read from the
environment: what the API tests share."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sql.database import upgrade
from worker.commands.api import create_app
from worker.config import load_settings


def api_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str,
            tokens: dict[str, tuple[str, str, str]], sections: str = "", api_options: str = "") -> Iterator:
    """The API app on `database_url` (migrated first), disposed of afterwards; for a fixture to `yield from`.

    `tokens` maps an environment variable to (token, name, role); `sections` is YAML for other top-level
    sections of the configuration, `api_options` YAML lines for the `api` section (indented by two spaces)."""
    for variable, (token, _name, _role) in tokens.items():
        monkeypatch.setenv(variable, token)
    config = tmp_path / "triage.yaml"
    config.write_text(
        f"var_dir: {tmp_path / 'var'}\ndatabase:\n  url: {database_url}\n" + sections
        + "api:\n" + api_options + "  tokens:\n"
        + "".join(f"    - {{token_env: {variable}, name: {name}, role: {role}}}\n"
                  for variable, (_token, name, role) in tokens.items()))
    upgrade(database_url)
    app = create_app(load_settings(config, environ={}))
    yield app
    app.state.engine.dispose()


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    """A TestClient of the module's `app` fixture, with the app's lifespan run."""
    with TestClient(app) as client:
        yield client
