"""What the audit log and the administrators' views keep, and what senders' text can do to the fairness page,
against real `triage api` processes: a request that fails is still audited, URLs in the configuration view carry no
secrets, and a `$` in a group value is text, not Matplotlib math."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from sql.audit_schema import audit_log
from tests.support.api_process import ApiProcess
from train.fairness.cohort import write_cohort_db
from train.fairness.make_cohort import make_cohort, write_cohort

ADMIN_TOKEN = "tok-admin-" + "a" * 36
TOKENS = {"ops": ("admin", ADMIN_TOKEN)}
WEBHOOK_KEY = "x1Vb3kS9dQ7pL2mN8rT4wY6z"
ACCESS_TOKEN = "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJlc2lnbmF0dXJl"


def test_a_request_that_ends_in_a_server_error_is_audited(tmp_path):
    url = f"sqlite:///{tmp_path / 'api.db'}"
    api = ApiProcess(tmp_path, url, TOKENS).start()
    try:
        engine = create_engine(url)
        with engine.begin() as c:  # the reports table is gone: reading a report fails inside the route
            c.execute(text("DROP TABLE ground_truth_labels"))
            c.execute(text("DROP TABLE reports"))

        response = httpx.get(f"{api.url}/reports/7", headers=api.headers("ops"))

        assert response.status_code == 500
        with engine.connect() as c:
            rows = c.execute(select(audit_log.c.path, audit_log.c.principal, audit_log.c.status_code)).all()
        engine.dispose()
        assert [tuple(r) for r in rows] == [("/reports/7", "ops", 500)]
    finally:
        api.stop()


def test_the_configuration_view_hides_secrets_inside_urls(tmp_path):
    api = ApiProcess(tmp_path, f"sqlite:///{tmp_path / 'api.db'}", TOKENS, config={"publishers": [
        {"name": "ops-chat", "kind": "webhook", "url": f"https://hooks.chat.example/services/T024BE7LD/{WEBHOOK_KEY}"},
        {"name": "pacs-ups", "kind": "ups_rs", "url": f"https://pacs.example/dicom-web?access_token={ACCESS_TOKEN}"},
        {"name": "fhir", "kind": "fhir", "url": "https://fhir.example/R4?sig=Zm9vYmFyYmF6cXV4cXV1eA&mode=x"},
    ]}).start()
    try:
        response = httpx.get(f"{api.url}/admin/config", headers=api.headers("ops"))
    finally:
        api.stop()
    assert response.status_code == 200
    body = response.text
    assert WEBHOOK_KEY not in body and ACCESS_TOKEN not in body and "Zm9vYmFyYmF6cXV4cXV1eA" not in body
    urls = [p["url"] for p in response.json()["publishers"]]
    # Where each goes stays readable.
    assert urls == ["https://hooks.chat.example/***", "https://pacs.example/dicom-web?access_token=***",
                    "https://fhir.example/R4?sig=***&mode=x"]


# --- finding 5: a `$` in a group value ---------------------------------------------------------------------

#: A scanner manufacturer as a DICOM sender may write it: between two `$` Matplotlib reads TeX, and `\q` is none.
MANUFACTURER = r"Fabrikam $\q$ Imaging"


@pytest.fixture
def cohort_csv(tmp_path):
    rows = make_cohort(studies=800, seed=11)
    for row in rows:
        if row["scanner_manufacturer"] == "Fabrikam":
            row["scanner_manufacturer"] = MANUFACTURER
    path = tmp_path / "cohort.csv"
    write_cohort(rows, path)
    return path


@pytest.mark.slow
def test_the_fairness_page_renders_a_group_value_with_dollar_signs(tmp_path, postgres_url, cohort_csv):
    api = ApiProcess(tmp_path / "api", postgres_url, TOKENS)
    engine = create_engine(postgres_url)
    write_cohort_db(engine, cohort_csv)
    engine.dispose()
    api.start()
    try:
        assert httpx.post(f"{api.url}/fairness/refresh", headers=api.headers("ops"), timeout=120).status_code == 200
        page = httpx.get(f"{api.url}/fairness", headers=api.headers("ops"), timeout=120)
    finally:
        api.stop()
    assert page.status_code == 200, page.text[-500:]
    assert "Fabrikam $\\q$ Imaging" in page.text


@pytest.mark.slow
def test_the_fairness_report_command_renders_a_group_value_with_dollar_signs(tmp_path, cohort_csv):
    out = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-m", "worker.cli", "fairness", "report", "--cohort", str(cohort_csv),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Fabrikam $\\q$ Imaging" in out.read_text()
