"""The web API's report endpoint and fairness page, on real Postgres, with bearer tokens."""
from __future__ import annotations

import re

import pytest

from tests.support.api_app import api_app, client  # noqa: F401 (the fixture)
from train.fairness.cohort import write_cohort_db
from train.fairness.make_cohort import make_cohort, write_cohort

RADIOLOGIST, ADMIN = {"Authorization": "Bearer rad-token"}, {"Authorization": "Bearer admin-token"}


@pytest.fixture
def app(postgres_url, tmp_path, monkeypatch):
    yield from api_app(tmp_path, monkeypatch, postgres_url, {
        "TEST_RAD_TOKEN": ("rad-token", "reader", "radiologist"),
        "TEST_ADMIN_TOKEN": ("admin-token", "ris", "admin")}, sections="fairness:\n  timezone: Europe/London\n")


REPORT = {
    "accession_number": "ACC42",
    "exam_at": "2026-01-10T09:30:00",
    "reported_at": "2026-01-12T16:05:00+00:00",
    "text": "Findings: Large left MCA territory infarct with mild mass effect. No hemorrhage.\n"
            "Impression: Acute left MCA infarct; hemorrhagic transformation cannot be excluded.",
    "message_id": "ris-42",
    "patient": {"sex": "M", "age_years": 82, "postcode": "QS3 9ZZ", "insurance_class": "Private"},
}


def test_a_posted_report_is_stored_with_its_labels(client):
    response = client.post("/reports", json=REPORT, headers=RADIOLOGIST)

    assert response.status_code == 201, response.text
    body = response.json()
    assert {l["label"]: l["value"] for l in body["labels"]} == {
        "structural_mass_effect": 1, "vascular_hemorrhagic_intracranial_hemorrhage": -1,
        "vascular_ischemic_large_vessel_stroke": 1}
    stored = client.get(f"/reports/{body['report_id']}", headers=RADIOLOGIST).json()
    assert stored["source"] == "http" and stored["status"] == "F" and stored["accession_number"] == "ACC42"
    assert stored["exam_at"].startswith("2026-01-10T09:30:00")  # January in London is UTC
    assert all(label["source"] == "keyword-labeller/1" and label["evidence"] for label in stored["labels"])
    again = client.post("/reports", json=REPORT, headers=RADIOLOGIST).json()
    assert again["duplicate"] and again["report_id"] == body["report_id"]


def test_report_endpoint_requires_a_token_and_refuses_bad_reports_by_name(client):
    assert client.post("/reports", json=REPORT).status_code == 401
    nameless = {k: v for k, v in REPORT.items() if k != "accession_number"}
    response = client.post("/reports", json=nameless, headers=ADMIN)
    assert response.status_code == 422 and "neither an accession number nor a study instance UID" in response.text
    backwards = {**REPORT, "exam_at": "2026-02-01T00:00:00+00:00"}
    response = client.post("/reports", json=backwards, headers=ADMIN)
    assert response.status_code == 422 and "before the examination" in response.text


def test_fairness_page_shows_the_latest_refresh_with_its_plots(client, app, tmp_path):
    assert client.get("/fairness", headers=RADIOLOGIST).status_code == 404
    write_cohort(make_cohort(studies=800, seed=11), tmp_path / "small.csv")
    write_cohort_db(app.state.engine, tmp_path / "small.csv")

    assert client.post("/fairness/refresh", headers=RADIOLOGIST).status_code == 403
    refreshed = client.post("/fairness/refresh", headers=ADMIN)
    assert refreshed.status_code == 200, refreshed.text

    page = client.get("/fairness", headers=RADIOLOGIST)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert re.findall(r'<img class="plot" id="([\w.-]+)"', page.text) == [
        "forest-3", "forest-7", "boxes-tpr", "boxes-fpr", "distributions"]
    assert f"refresh {refreshed.json()['refresh_id']}" in page.text and "800 studies" in page.text
    results = client.get("/fairness/results", params={"tables": True}, headers=RADIOLOGIST).json()
    assert results["refresh_id"] == refreshed.json()["refresh_id"] and results["studies"] == 800
    assert any(row["attribute"] == "region" for row in results["odds"])
    assert all("bootstrap_group" not in row for row in results["disparities"])
