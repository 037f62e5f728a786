"""The HTTP API's doors: tokens, roles, the audit log of every access to a study, secrets kept out of sight,
and HTTPS when `triage api` runs with a certificate."""
from __future__ import annotations

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import insert, select, text

from sql.audit_schema import audit_log, audit_studies
from sql.database import upgrade
from sql.schema import studies, utcnow
from worker.api.app import create_app
from worker.api.audit import redact
from worker.config import load_settings

STUDY = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture
def api(tmp_path):
    (tmp_path / "radiologist.token").write_text("tok-radiologist-" + "r" * 24 + "\n")
    (tmp_path / "admin.token").write_text("tok-admin-" + "a" * 30 + "\n")
    config = {
        "var_dir": str(tmp_path / "var"),
        "database": {"url": f"sqlite:///{tmp_path / 'triage.db'}"},
        "api": {"tokens": [
            {"name": "dr.grey", "role": "radiologist", "token_file": str(tmp_path / "radiologist.token")},
            {"name": "ops", "role": "admin", "token_file": str(tmp_path / "admin.token")},
        ]},
    }
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(config))
    settings = load_settings(tmp_path / "triage.yaml", environ={
        "TRIAGE_BROKER__URL": "redis://:broker-password@127.0.0.1:6379/0"})
    upgrade(settings.database_url)
    app = create_app(settings)
    with app.state.engine.begin() as c:
        now = utcnow()
        c.execute(insert(studies).values(study_instance_uid=STUDY, accession_number="A77", status="done",
                                         version=1, instance_count=3, first_received_at=now,
                                         last_received_at=now, modalities="MR"))
    client = TestClient(app)
    client.tokens = {"radiologist": (tmp_path / "radiologist.token").read_text().strip(),
                     "admin": (tmp_path / "admin.token").read_text().strip()}
    client.folder = tmp_path
    yield client
    app.state.engine.dispose()


def _as(client, who: str) -> dict:
    return {"Authorization": f"Bearer {client.tokens[who]}"}


def _audit(client) -> list[dict]:
    with client.app.state.engine.connect() as c:
        rows = [dict(r) for r in c.execute(select(audit_log).order_by(audit_log.c.id)).mappings()]
        links = c.execute(select(audit_studies.c.audit_id, audit_studies.c.study_instance_uid)).all()
    for row in rows:
        row["studies"] = sorted(uid for audit_id, uid in links if audit_id == row["id"])
    return rows


@pytest.mark.parametrize("path", ["/worklist/items", f"/worklist/studies/{STUDY}", "/reports/1",
                                  "/fairness/results", "/admin/config", "/admin/audit"])
def test_no_token_is_401_and_the_attempt_is_logged(api, path):
    response = api.get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    (entry,) = _audit(api)
    assert (entry["principal"], entry["action"], entry["status_code"], entry["path"]) == (None, "denied", 401, path)


def test_a_wrong_token_is_401(api):
    assert api.get("/worklist/items", headers={"Authorization": "Bearer not-a-token"}).status_code == 401


@pytest.mark.parametrize("method,path", [
    ("GET", "/admin/config"),  # reading the configuration
    ("POST", "/admin/tokens/reload"),  # changing who may log in
    ("GET", "/admin/audit"),
    ("POST", "/models/tiny-2/promote"),  # promoting a model (whatever route serves it)
    ("POST", "/models/rollback"),
    ("POST", "/fairness/refresh"),
])
def test_a_radiologist_cannot_change_configuration_or_promote_models(api, method, path):
    response = api.request(method, path, headers=_as(api, "radiologist"))
    assert response.status_code == 403, response.text
    (entry,) = _audit(api)
    assert (entry["principal"], entry["role"], entry["action"]) == ("dr.grey", "radiologist", "denied")


def test_every_access_to_a_study_is_in_the_audit_log(api):
    radiologist = _as(api, "radiologist")
    listing = api.get("/worklist/items", headers=radiologist)
    assert listing.status_code == 200 and STUDY in listing.text
    detail = api.get(f"/worklist/studies/{STUDY}", headers=radiologist)
    assert detail.status_code == 200
    missing_sr = api.get(f"/worklist/studies/{STUDY}/sr", headers=radiologist)  # asked for, even if not there
    entries = _audit(api)
    assert [(e["path"], e["principal"], e["action"], e["studies"]) for e in entries] == [
        ("/worklist/items", "dr.grey", "read", [STUDY]),
        (f"/worklist/studies/{STUDY}", "dr.grey", "read", [STUDY]),
        (f"/worklist/studies/{STUDY}/sr", "dr.grey", "read", [STUDY]),
    ]
    assert entries[2]["status_code"] == missing_sr.status_code
    # Administrators can ask who saw a study.
    seen = api.get("/admin/audit", params={"study_instance_uid": STUDY}, headers=_as(api, "admin")).json()
    assert {e["path"] for e in seen} == {e["path"] for e in entries}


def test_the_audit_log_fails_closed(api):
    with api.app.state.engine.begin() as c:
        c.execute(text("DROP TABLE audit_studies"))
        c.execute(text("DROP TABLE audit_log"))
    response = api.get(f"/worklist/studies/{STUDY}", headers=_as(api, "radiologist"))
    assert response.status_code == 503 and STUDY not in response.text


def test_the_configuration_view_is_for_admins_and_shows_no_secrets(api):
    response = api.get("/admin/config", headers=_as(api, "admin"))
    assert response.status_code == 200
    body = response.text
    assert "broker-password" not in body and "redis://:***@127.0.0.1:6379/0" in body
    assert api.tokens["admin"] not in body and api.tokens["radiologist"] not in body
    assert "radiologist.token" in body  # where the secret lives is not itself a secret


def test_tokens_are_rotated_without_a_restart(api):
    old = _as(api, "radiologist")
    (api.folder / "radiologist.token").write_text("tok-rotated-" + "n" * 28)
    assert api.post("/admin/tokens/reload", headers=_as(api, "admin")).status_code == 200
    assert api.get("/worklist/items", headers=old).status_code == 401
    rotated = {"Authorization": "Bearer tok-rotated-" + "n" * 28}
    assert api.get("/worklist/items", headers=rotated).status_code == 200


def test_redaction_covers_urls_and_secret_keys():
    config = {"database": {"url": "postgresql+psycopg2://triage:s3cr3t@db:5432/triage"},
              "publishers": [{"secret": "hmac-key", "secret_file": "/run/secrets/hook", "token_env": "HOOK"}],
              "api": {"tokens": [{"token_file": "/etc/triage/admin.token", "name": "ops"}]}}
    redacted = redact(config)
    assert redacted["database"]["url"] == "postgresql+psycopg2://triage:***@db:5432/triage"
    assert redacted["publishers"][0] == {"secret": "***", "secret_file": "/run/secrets/hook", "token_env": "HOOK"}
    assert redacted["api"]["tokens"][0]["token_file"] == "/etc/triage/admin.token"


def test_secrets_can_come_from_files_named_in_the_environment(tmp_path):
    secret = tmp_path / "db_url"
    secret.write_text("postgresql+psycopg2://triage:from-a-file@db/triage\n")
    settings = load_settings(environ={"TRIAGE_DATABASE__URL_FILE": str(secret)})
    assert settings.database_url == "postgresql+psycopg2://triage:from-a-file@db/triage"


