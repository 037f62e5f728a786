"""The landing page and the browser session that opens the fairness page after the worklist sign-in, on real
PostgreSQL. (In Chromium: tests/e2e/test_pages_browser.py.)"""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from sql.audit_schema import audit_log
from tests.support.api_app import api_app, client  # noqa: F401 (the fixture)
from train.fairness.cohort import write_cohort_db
from train.fairness.make_cohort import make_cohort, write_cohort
from worker.api.session_cookie import COOKIE, session_principal, session_value
from worker.api.tokens import Principal

RADIOLOGIST, ADMIN, SENDER = ({"Authorization": f"Bearer {t}"} for t in ("rad-token", "admin-token", "send-token"))
BROWSER = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture
def app(postgres_url, tmp_path, monkeypatch):
    yield from api_app(tmp_path, monkeypatch, postgres_url, {
        "TEST_RAD_TOKEN": ("rad-token", "dr-reader", "radiologist"),
        "TEST_ADMIN_TOKEN": ("admin-token", "ris", "admin"),
        "TEST_SEND_TOKEN": ("send-token", "modality", "sender")}, api_options="  session_max_age_s: 600\n")


@pytest.fixture
def refreshed(app, client, tmp_path):
    write_cohort(make_cohort(studies=400, seed=5), tmp_path / "cohort.csv")
    write_cohort_db(app.state.engine, tmp_path / "cohort.csv")
    response = client.post("/fairness/refresh", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["refresh_id"]


def test_the_landing_page_links_the_worklist_fairness_api_docs_and_health(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for link in ('href="worklist/"', 'href="fairness"', 'href="docs"', 'href="healthz"'):
        assert link in page.text
    for target in ("/worklist/", "/docs", "/healthz", "/worklist/assets/worklist.css"):
        assert client.get(target).status_code == 200, target


def test_a_session_opened_with_the_token_shows_the_fairness_page_without_a_header(client, refreshed):
    assert client.get("/fairness", headers={"Accept": "application/json"}).status_code == 401
    opened = client.post("/session", headers=RADIOLOGIST)
    assert opened.status_code == 200 and opened.json()["name"] == "dr-reader"
    cookie = opened.headers["set-cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "rad-token" not in cookie

    page = client.get("/fairness", headers=BROWSER)  # the client sends the cookie, as a browser does
    assert page.status_code == 200 and f"refresh {refreshed}" in page.text

    client.delete("/session")
    assert client.get("/fairness", headers={"Accept": "application/json"}).status_code == 401


def test_the_session_cookie_reads_pages_and_nothing_else(client, refreshed):
    client.post("/session", headers=RADIOLOGIST)
    assert client.get("/fairness").status_code == 200
    # JSON routes and anything that changes state still need the bearer header
    assert client.get("/worklist/items").status_code == 401
    assert client.get("/fairness/results").status_code == 401
    assert client.post("/fairness/refresh").status_code == 401
    assert client.post("/session").status_code == 401  # a session cannot renew itself without the token


def test_a_browser_without_a_session_is_sent_to_sign_in_and_back(client):
    response = client.get("/fairness", headers=BROWSER, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/worklist/login?next=/fairness"


def test_a_sender_token_opens_a_session_that_may_not_read_the_fairness_page(client, refreshed):
    client.post("/session", headers=SENDER)
    assert client.get("/fairness", headers=BROWSER).status_code == 403


class _GuessedKey:
    """A token store that signs with a key the server does not have."""

    def signing_keys(self, principal: Principal) -> list[str]:
        return ["guessed"]


def test_forged_expired_and_revoked_sessions_are_refused(app, client, refreshed, monkeypatch):
    store = app.state.token_store
    reader = Principal("dr-reader", "radiologist")
    good = session_value(store, reader, int(time.time()) + 600)
    assert session_principal(store, good) == reader
    version, name, role, expires, mac = good.split(".")
    for forged in (".".join((version, name, "admin", expires, mac)),        # another role
                   ".".join((version, name, role, str(int(expires) + 10 ** 6), mac)),  # a later expiry
                   session_value(_GuessedKey(), reader, int(expires)),  # signed with a wrong key
                   "garbage", "v1.%%%.x.y.z", ""):
        assert session_principal(store, forged) is None, forged
    assert session_principal(store, session_value(store, reader, int(time.time()) - 1)) is None

    client.cookies.set(COOKIE, good)
    assert client.get("/fairness").status_code == 200
    monkeypatch.setenv("TEST_RAD_TOKEN", "rotated-token")  # the token is rotated: its sessions end with it
    assert client.post("/admin/tokens/reload", headers=ADMIN).status_code == 200
    assert client.get("/fairness").status_code == 401


def test_a_page_read_with_the_session_is_audited_under_its_principal(app, client, refreshed):
    client.post("/session", headers=RADIOLOGIST)
    client.get("/fairness")
    with app.state.engine.connect() as connection:
        row = connection.execute(select(audit_log.c.principal, audit_log.c.status_code)
                                 .where(audit_log.c.path == "/fairness").order_by(audit_log.c.id.desc())).first()
    assert tuple(row) == ("dr-reader", 200)
