"""One sign-in for the worklist and the fairness report, in headless Chromium against the real API process.

From the landing page a radiologist follows "Fairness report", is sent to the worklist's sign-in, signs in once
with a token and lands on the report; the worklist's own link opens it again; signing out closes both. The token
never appears in a URL and no script can read the session cookie. Screenshots go to test-output/pages/.
"""
from __future__ import annotations

import pytest
import yaml

from pacs_bridge.study_attributes import AttributePolicy
from sql.database import make_engine, upgrade
from tests.support.browser import SIGN_IN_READY, ApiServer, Chromium, chromium, submit_token  # noqa: F401  (the fixture)
from tests.support.processes import REPO, free_port
from train.fairness.cohort import write_cohort_db
from train.fairness.make_cohort import make_cohort, write_cohort
from train.fairness.store import refresh
from worker.commands.train_settings import fairness_config
from worker.config import load_settings

pytestmark = pytest.mark.slow

SCREENSHOTS = REPO / "test-output" / "pages"
TOKEN = "radiologist-token-for-the-pages-test"
REPORT_SHOWN = "document.title === 'Turnaround and fairness' && document.querySelectorAll('img.plot').length > 0"


def test_one_sign_in_opens_the_worklist_and_the_fairness_report(tmp_path, postgres_url, chromium: Chromium):
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    config = {"var_dir": str(tmp_path / "var"), "database": {"url": postgres_url},
              "api": {"port": port, "tokens": [{"name": "dr-house", "role": "radiologist",
                                                "token_file": str(tmp_path / "token")}]}}
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(config))
    settings = load_settings(tmp_path / "triage.yaml", environ={})
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    write_cohort(make_cohort(studies=400, seed=5), tmp_path / "cohort.csv")
    write_cohort_db(engine, tmp_path / "cohort.csv")
    refresh(engine, fairness_config(settings.fairness), AttributePolicy.from_settings(settings.fairness.model_dump()))
    engine.dispose()

    api = ApiServer(tmp_path / "triage.yaml", tmp_path / "api.log", port)
    base = api.url

    visited: list[str] = []

    def at(expression: str, what: str) -> None:
        chromium.wait(expression, timeout=30, what=what)
        visited.append(chromium.evaluate("location.href"))

    try:
        api.start()
        chromium.navigate(f"{base}/")
        at("document.title === 'AI triage worker' && !!document.querySelector('a[href=fairness]')", "the landing page")
        chromium.screenshot(SCREENSHOTS / "1-landing.png")
        chromium.click("a[href=fairness]")
        at("location.pathname === '/worklist/login' && " + SIGN_IN_READY,
           "the sign-in page, ready")
        assert chromium.evaluate("new URLSearchParams(location.search).get('next')") == "/fairness"

        submit_token(chromium, TOKEN)
        at(f"location.pathname === '/fairness' && {REPORT_SHOWN}", "the fairness report after signing in")
        assert "400 studies" in chromium.evaluate("document.body.innerText")
        chromium.screenshot(SCREENSHOTS / "2-fairness-after-sign-in.png")
        assert "triage_session" not in chromium.evaluate("document.cookie")  # HttpOnly: no script reads it

        chromium.navigate(f"{base}/worklist/")
        at("document.querySelector('#user')?.textContent?.includes('dr-house')", "the worklist, signed in")
        chromium.click("a[href='../fairness']")
        at(f"location.pathname === '/fairness' && {REPORT_SHOWN}", "the report from the worklist's link")

        chromium.navigate(f"{base}/worklist/")
        at("document.querySelector('#user')?.textContent?.includes('dr-house')", "the worklist again")
        chromium.click("#logout")
        at("location.pathname === '/worklist/login'", "the sign-in page after signing out")
        chromium.navigate(f"{base}/fairness")
        at("location.pathname === '/worklist/login'", "signed out: the report asks to sign in again")

        assert not [url for url in visited if TOKEN in url], visited
        assert not [line for line in chromium.console if "Error" in line], chromium.console
    finally:
        api.stop()
    assert TOKEN not in (tmp_path / "api.log").read_text()  # nor in the access log
