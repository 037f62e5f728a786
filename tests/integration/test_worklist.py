"""The worklist API behind the page: reading order, who may see it, cheap polling, and the evidence of one
study.

Real Postgres; the API is called in-process (FastAPI's test client). The page itself is tested in Chromium by
test_worklist_browser.py.
"""
from __future__ import annotations

import io
from datetime import timedelta

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import insert

from pacs_bridge.results import Finding, SimilarStudy, TriageResult
from pacs_bridge.sr import build_sr
from sql.database import make_engine, upgrade
from sql.report_schema import reports
from sql.schema import events, predictions, processing_runs, studies, utcnow
from worker.api.app import create_app
from worker.config import load_settings
from worker.slice_evidence import study_reference

RADIOLOGIST, ADMIN = "token-of-a-radiologist", "token-of-an-admin"


@pytest.fixture
def api(tmp_path, postgres_url):
    upgrade(postgres_url)
    (tmp_path / "r.token").write_text(RADIOLOGIST)
    (tmp_path / "a.token").write_text(ADMIN)
    settings = load_settings(environ={})
    settings.var_dir = tmp_path / "var"
    settings.database.url = postgres_url
    settings.api.tokens = [
        {"name": "dr-grey", "role": "radiologist", "token_file": str(tmp_path / "r.token")},
        {"name": "ops", "role": "admin", "token_file": str(tmp_path / "a.token")}]
    settings.worklist.viewer_url = "https://viewer.example.org/?study={study_uid}&acc={accession}"
    client = TestClient(create_app(settings))
    client.engine = make_engine(postgres_url)
    yield client
    client.engine.dispose()


def api_settings(api):
    return api.app.state.settings


def get(api, path: str, token: str = RADIOLOGIST, **headers):
    return api.get(path, headers={"Authorization": f"Bearer {token}", **headers})


def add_study(engine, *, waiting: timedelta, priority: str | None = "routine", status: str = "done",
              run_status: str | None = "done", findings: dict[str, float] | None = None,
              accession: str | None = None, sr_path: str | None = None, uid: str | None = None) -> str:
    uid, arrived = uid or generate_uid(), utcnow() - waiting
    with engine.begin() as c:
        study_id = c.execute(insert(studies).values(
            study_instance_uid=uid, accession_number=accession or f"A{uid[-6:]}",
            study_description="MRI BRAIN", modalities="MR", status=status, version=1, instance_count=10,
            first_received_at=arrived, last_received_at=arrived)).inserted_primary_key[0]
        if run_status is not None:
            run_id = c.execute(insert(processing_runs).values(
                study_id=study_id, study_version=1, pipeline="neuro_mri", status=run_status, attempts=1,
                priority=priority if run_status == "done" else None, model_name="prima",
                model_version="1.0.7", last_image_at=arrived, sr_path=sr_path,
                finished_at=utcnow() if run_status in ("done", "failed") else None)).inserted_primary_key[0]
            rows = [{"run_id": run_id, "kind": "diagnosis", "label": label, "probability": p,
                     "threshold": 0.5, "reported": 1} for label, p in (findings or {}).items()]
            rows += [{"run_id": run_id, "kind": "priority", "label": "high", "probability": 0.8,
                      "threshold": None, "reported": 0},
                     {"run_id": run_id, "kind": "referral", "label": "neurosurgery", "probability": 0.7,
                      "threshold": None, "reported": int(priority == "stat")}]
            c.execute(insert(predictions), rows)
    return uid


def order(api) -> list[str]:
    response = get(api, "/worklist/items")
    assert response.status_code == 200
    return [item["study_instance_uid"] for item in response.json()["items"]]


def test_studies_are_listed_by_ai_priority_then_by_time_waiting(api):
    e = api.engine
    routine_3h = add_study(e, waiting=timedelta(hours=3))
    stat_10m = add_study(e, waiting=timedelta(minutes=10), priority="stat",
                         findings={"trauma_subdural_hematoma": 0.97, "structural_mass_effect": 0.6,
                                   "structural_edema": 0.4, "structural_midline_shift": 0.3})
    urgent_1h = add_study(e, waiting=timedelta(hours=1), priority="urgent")
    urgent_2h = add_study(e, waiting=timedelta(hours=2), priority="urgent")
    pending_5h = add_study(e, waiting=timedelta(hours=5), status="processing", run_status="running")
    receiving = add_study(e, waiting=timedelta(minutes=1), status="receiving", run_status=None)
    failed = add_study(e, waiting=timedelta(minutes=30), status="failed", run_status="failed")
    add_study(e, waiting=timedelta(hours=9), status="ignored", run_status=None)

    assert order(api) == [stat_10m, urgent_2h, urgent_1h, pending_5h, routine_3h, failed, receiving]
    items = {i["study_instance_uid"]: i for i in get(api, "/worklist/items").json()["items"]}
    stat = items[stat_10m]
    assert (stat["priority"], stat["priority_rank"], stat["ai_status"]) == ("stat", 2, "done")
    # Only called findings (at or above the 0.5 threshold) are in the summary; 0.4 and 0.3 are not findings.
    assert [f["label"] for f in stat["findings"]] == ["trauma_subdural_hematoma", "structural_mass_effect"]
    assert stat["findings"][0]["name"] == "Subdural intracranial hemorrhage"
    assert all(f["positive"] for f in stat["findings"])
    assert stat["referrals"] == ["Neurosurgery"]
    assert (items[pending_5h]["ai_status"], items[pending_5h]["priority"]) == ("pending", None)
    assert items[failed]["ai_status"] == "failed"
    assert stat["links"]["viewer"] == f"https://viewer.example.org/?study={stat_10m}&acc={stat['accession_number']}"


def test_a_study_with_a_final_report_leaves_the_worklist(api):
    reported = add_study(api.engine, waiting=timedelta(hours=2), accession="ACC-READ")
    preliminary = add_study(api.engine, waiting=timedelta(hours=1), accession="ACC-PRELIM")
    with api.engine.begin() as c:
        for accession, status in (("ACC-READ", "F"), ("ACC-PRELIM", "P")):
            c.execute(insert(reports).values(accession_number=accession, status=status, reported_at=utcnow(),
                                             received_at=utcnow(), text="No acute finding.", source="http"))

    assert order(api) == [preliminary]
    assert get(api, f"/worklist/studies/{reported}").status_code == 200  # still reachable from a link


def test_studies_older_than_the_configured_age_leave_the_list(api):
    recent = add_study(api.engine, waiting=timedelta(days=29))
    add_study(api.engine, waiting=timedelta(days=31), priority="stat")

    assert order(api) == [recent]


def test_an_unchanged_worklist_answers_304_and_a_new_result_changes_it(api):
    add_study(api.engine, waiting=timedelta(hours=1))
    first = get(api, "/worklist/items")
    etag = first.headers["etag"]

    assert get(api, "/worklist/items", **{"If-None-Match": etag}).status_code == 304
    new = add_study(api.engine, waiting=timedelta(minutes=1), priority="stat")
    changed = get(api, "/worklist/items", **{"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["items"][0]["study_instance_uid"] == new


def test_the_data_needs_a_radiologist_or_admin_token_and_the_pages_do_not(api):
    add_study(api.engine, waiting=timedelta(hours=1))
    assert api.get("/worklist/items").status_code == 401
    assert get(api, "/worklist/items", token="guess").status_code == 401
    assert get(api, "/worklist/items", token=ADMIN).status_code == 200
    assert get(api, "/worklist/me").json() == {"name": "dr-grey", "role": "radiologist"}
    for page in ("/worklist/", "/worklist/login", "/worklist/study"):
        response = api.get(page)
        assert response.status_code == 200 and "<!doctype html>" in response.text
    assert api.get("/worklist", follow_redirects=False).headers["location"].endswith("/worklist/")
    assert api.get("/worklist/config").json() == {"login": "token", "oidc": {}, "poll_interval_s": 5.0}
    assert api.get("/worklist/assets/auth.js").headers["content-type"].startswith("text/javascript")
    assert api.get("/worklist/assets/..%2F..%2Fapp.py").status_code == 404
    assert api.get("/worklist/assets/index.html").status_code == 404


def test_the_openapi_document_describes_the_worklist_routes(api):
    document = api.get("/openapi.json").json()
    paths = document["paths"]
    for path in ("/worklist/items", "/worklist/studies/{study_uid}", "/worklist/studies/{study_uid}/sr",
                 "/worklist/me", "/worklist/config"):
        assert path in paths, path
    assert "/worklist/" not in paths and "/worklist/assets/{name}" not in paths  # pages are not API
    assert paths["/worklist/items"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/WorklistOut"}
    assert "HTTPBearer" in str(paths["/worklist/items"]["get"].get("security"))


def test_a_studys_evidence_is_its_sr_similar_studies_and_priority_changes(api, tmp_path):
    from tests.support.sr_checks import DEVICE_UID, mr_study

    evidence = mr_study(series=1, slices=4)
    study_uid = evidence[0].StudyInstanceUID
    prior = add_study(api.engine, waiting=timedelta(days=30), accession="ACC-PRIOR")
    unknown_prior = generate_uid()
    result = TriageResult(
        study_instance_uid=study_uid, priority="stat",
        findings=(Finding("trauma_subdural_hematoma", 0.97, 0.41),
                  Finding("structural_mass_effect", 0.61, 0.5)),
        referrals=("neurosurgery",), model_version="1.0.7",
        # The SR names them by pseudonymous reference (the site key under var_dir); the worklist resolves them.
        similar_studies=(SimilarStudy(prior, 0.94, ("trauma_subdural_hematoma",),
                                      reference=study_reference(api_settings(api), prior)),
                         SimilarStudy(unknown_prior, 0.81, (),
                                      reference=study_reference(api_settings(api), unknown_prior))))
    sr = build_sr(result, evidence, device_uid=DEVICE_UID)
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    add_study(api.engine, uid=study_uid, waiting=timedelta(minutes=5), priority="stat", sr_path=str(sr_path),
              findings={"trauma_subdural_hematoma": 0.97, "structural_mass_effect": 0.61})
    with api.engine.begin() as c:
        c.execute(insert(events).values(
            at=utcnow(), kind="publication", study_instance_uid=study_uid,
            reason="ups (ups_rs) 1.2.3: raised: raised LOW -> HIGH: AI priority stat",
            detail={"publisher": "ups", "kind": "ups_rs", "target": "1.2.3", "action": "raised",
                    "original": "LOW", "new": "HIGH", "ai_priority": "stat"}))

    listed = get(api, "/worklist/items").json()["items"][0]
    detail = get(api, f"/worklist/studies/{study_uid}").json()

    assert listed["similar_studies"] == 2
    assert listed["priority_changes"] == [{"publisher": "ups", "kind": "ups_rs", "target": "1.2.3",
                                           "action": "raised", "original": "LOW", "new": "HIGH"}]
    assert [(s["study_instance_uid"], s["on_worklist"]) for s in detail["similar_studies"]] == \
        [(prior, True), (study_reference(api_settings(api), unknown_prior), False)]  # not ours: a pseudonym
    assert detail["similar_studies"][0]["links"]["detail"] == f"study?uid={prior}"
    assert detail["priority_scores"] == {"high": 0.8}
    assert [p["original"] for p in detail["publications"]] == ["LOW"]
    sr_response = get(api, "/worklist/" + listed["links"]["sr"], Accept="application/dicom")
    assert sr_response.headers["content-type"] == "application/dicom"
    assert pydicom.dcmread(io.BytesIO(sr_response.content)).SOPInstanceUID == sr.SOPInstanceUID
    assert get(api, f"/worklist/studies/{generate_uid()}").status_code == 404
