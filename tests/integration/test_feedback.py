"""Radiologists' feedback on the AI's result, the worklist's demographics, called findings, not-analysed rows and
key image: through the real API (FastAPI's test client) on SQLite and PostgreSQL. (In Chromium, end to end:
tests/e2e/test_worklist_feedback_browser.py.)"""
from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import insert, select

from sql.audit_schema import audit_log, audit_studies
from sql.database import upgrade
from sql.feedback_schema import ai_feedback
from sql.schema import studies, utcnow
from tests.support.studies import CALLED, NOT_CALLED, analysed_study, not_analysed_study
from train.fairness.agreement import agreement_by_group, render_agreement_html
from train.nightly import collect_feedback_truth, collect_truth
from worker.api.app import create_app
from worker.config import load_settings

TOKENS = {"radiologist": "rad-token", "admin": "admin-token", "sender": "send-token"}
HEADERS = {role: {"Authorization": f"Bearer {token}"} for role, token in TOKENS.items()}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from train.phantoms import write_phantom_study

    bleed = write_phantom_study(tmp_path_factory.mktemp("bleed"), lesion="subdural_haemorrhage", seed=11)
    single = write_phantom_study(tmp_path_factory.mktemp("one"), lesion="tumour", seed=3, series=["AX DWI ADC"])
    return bleed.files, single.files[:1]


@pytest.fixture
def api(bookkeeping_url, tmp_path, monkeypatch, phantoms):
    for role, token in TOKENS.items():
        monkeypatch.setenv(f"TEST_{role.upper()}_TOKEN", token)
    config = tmp_path / "triage.yaml"
    config.write_text(
        f"var_dir: {tmp_path / 'var'}\ndatabase:\n  url: {bookkeeping_url}\napi:\n  tokens:\n"
        "    - {token_env: TEST_RADIOLOGIST_TOKEN, name: dr-reader, role: radiologist}\n"
        "    - {token_env: TEST_ADMIN_TOKEN, name: ops, role: admin}\n"
        "    - {token_env: TEST_SENDER_TOKEN, name: modality, role: sender}\n")
    upgrade(bookkeeping_url)
    app = create_app(load_settings(config, environ={}))
    engine = app.state.engine
    study_uid, run_id = analysed_study(engine, phantoms[0], tmp_path / "sr")
    refused_uid = not_analysed_study(engine, phantoms[1])
    with TestClient(app) as client:
        yield client, engine, study_uid, run_id, refused_uid
    engine.dispose()


def test_a_radiologists_verdicts_are_stored_audited_and_become_labels_and_agreement(api):
    client, engine, study_uid, run_id, _ = api
    url = f"/worklist/studies/{study_uid}/feedback"
    agreed = client.post(url, headers=HEADERS["radiologist"],
                         json={"target": "finding", "label": CALLED, "verdict": "agree", "comment": "clear bleed"})
    assert agreed.status_code == 201, agreed.text
    assert client.post(url, headers=HEADERS["radiologist"],
                       json={"target": "priority", "label": "stat", "verdict": "disagree"}).status_code == 201

    with engine.connect() as c:
        rows = c.execute(select(ai_feedback).order_by(ai_feedback.c.id)).mappings().all()
        audited = c.execute(select(audit_log.c.principal, audit_log.c.method, audit_log.c.action,
                                   audit_studies.c.study_instance_uid)
                            .join(audit_studies, audit_studies.c.audit_id == audit_log.c.id)
                            .where(audit_log.c.path == url)).all()
        truth = collect_truth(c)
        agreement = agreement_by_group(c)
    assert [(r["target"], r["label"], r["ai_value"], r["verdict"], r["comment"], r["principal"], r["run_id"])
            for r in rows] == [("finding", CALLED, "present", "agree", "clear bleed", "dr-reader", run_id),
                               ("priority", "stat", "stat", "disagree", None, "dr-reader", run_id)]
    assert [tuple(a) for a in audited] == [("dr-reader", "POST", "change", study_uid)] * 2
    assert truth[study_uid].labels == {CALLED: 1} and truth[study_uid].partial
    by_key = {(r.attribute, r.group, r.target): (r.verdicts, r.agreed) for r in agreement}
    assert by_key[("sex", "F", "all")] == (2, 1) and by_key[("sex", "F", "finding")] == (1, 1)
    assert by_key[("age_band", "60-69", "priority")] == (1, 0)
    assert 'id=agreement-table' in render_agreement_html(agreement)

    # Changing one's mind adds a row; the latest verdict is the label.
    assert client.post(url, headers=HEADERS["radiologist"],
                       json={"target": "finding", "label": CALLED, "verdict": "disagree"}).status_code == 201
    with engine.connect() as c:
        assert collect_feedback_truth(c)[study_uid].labels == {CALLED: 0}
        assert c.execute(select(ai_feedback.c.id)).all().__len__() == 3
    items = client.get("/worklist/items", headers=HEADERS["radiologist"]).json()["items"]
    [item] = [i for i in items if i["study_instance_uid"] == study_uid]
    assert item["feedback"] == {f"finding:{CALLED}": "disagree", "priority": "disagree"}


@pytest.mark.parametrize("role", ["admin", "sender"])
def test_only_a_radiologist_may_give_feedback(api, role):
    client, engine, study_uid, _, _ = api
    response = client.post(f"/worklist/studies/{study_uid}/feedback", headers=HEADERS[role],
                           json={"target": "finding", "label": CALLED, "verdict": "agree"})
    assert response.status_code == 403
    with engine.connect() as c:
        assert c.execute(select(ai_feedback)).all() == []
        assert c.execute(select(audit_log.c.action).where(audit_log.c.status_code == 403)).scalars().all() \
            == ["denied"]


def test_feedback_on_what_the_ai_did_not_say_is_refused_and_nothing_is_stored(api):
    client, engine, study_uid, _, refused_uid = api
    post = lambda uid, body: client.post(f"/worklist/studies/{uid}/feedback",
                                         headers=HEADERS["radiologist"], json=body)
    not_called = post(study_uid, {"target": "finding", "label": NOT_CALLED, "verdict": "disagree"})
    assert not_called.status_code == 422 and "did not call" in not_called.json()["detail"]
    wrong_priority = post(study_uid, {"target": "priority", "label": "routine", "verdict": "agree"})
    assert wrong_priority.status_code == 422 and "'stat'" in wrong_priority.json()["detail"]
    assert post(refused_uid, {"target": "priority", "label": "stat", "verdict": "agree"}).status_code == 409
    assert post(study_uid, {"target": "finding", "label": CALLED, "verdict": "maybe"}).status_code == 422
    assert post(study_uid, {"target": "finding", "label": CALLED, "verdict": "agree",
                            "comment": "x" * 2001}).status_code == 422
    with engine.connect() as c:
        assert c.execute(select(ai_feedback)).all() == []


def test_the_worklist_shows_called_findings_demographics_to_radiologists_and_not_analysed_reasons(api):
    client, engine, study_uid, _, refused_uid = api
    items = {i["study_instance_uid"]: i for i in
             client.get("/worklist/items", headers=HEADERS["radiologist"]).json()["items"]}
    analysed = items[study_uid]
    assert [f["label"] for f in analysed["findings"]] == [CALLED]  # 0.31 < 0.5 is not a finding
    with engine.connect() as c:
        sex, age = c.execute(select(studies.c.patient_sex, studies.c.patient_age)
                             .where(studies.c.study_instance_uid == study_uid)).one()
    assert sex and age and (analysed["patient_sex"], analysed["patient_age"]) == (sex, age)
    assert analysed["demographics"] and analysed["exam_at"]
    refused = items[refused_uid]
    assert refused["ai_status"] == "not_analysed" and refused["priority"] is None
    assert refused["not_analysed_reasons"] == ["no series matches required sequence 'FLAIR'",
                                               "series 'ADC' has 1 slice, 20 needed"]
    detail = client.get(f"/worklist/studies/{study_uid}", headers=HEADERS["radiologist"]).json()
    assert [f["label"] for f in detail["all_findings"]] == [CALLED, NOT_CALLED]

    for_admin = {i["study_instance_uid"]: i for i in
                 client.get("/worklist/items", headers=HEADERS["admin"]).json()["items"]}[study_uid]
    assert (for_admin["patient_sex"], for_admin["patient_age"], for_admin["exam_at"],
            for_admin["demographics"]) == (None, None, None, False)


def test_the_key_image_is_the_source_slice_with_the_findings_region_drawn_for_readers_only(api):
    client, _, study_uid, _, refused_uid = api
    url = f"/worklist/studies/{study_uid}/key-image.png"
    assert client.get(url).status_code == 401
    assert client.get(url, headers=HEADERS["sender"]).status_code == 403
    response = client.get(url, headers=HEADERS["radiologist"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content)).convert("RGB")
    assert image.width >= 384
    outline = (0xE6, 0x9F, 0x00)  # the first finding's colour
    assert (np.asarray(image) == outline).all(axis=-1).sum() > 100
    assert client.get(f"/worklist/studies/{refused_uid}/key-image.png",
                      headers=HEADERS["radiologist"]).status_code == 404


def test_a_final_report_outranks_feedback_as_the_nightly_label(api):
    from sql.report_schema import ground_truth_labels, reports

    client, engine, study_uid, _, _ = api
    assert client.post(f"/worklist/studies/{study_uid}/feedback", headers=HEADERS["radiologist"],
                       json={"target": "finding", "label": CALLED, "verdict": "agree"}).status_code == 201
    with engine.connect() as c:
        assert collect_truth(c)[study_uid].labels == {CALLED: 1}
    now = utcnow()
    with engine.begin() as c:
        report_id = c.execute(insert(reports).values(
            study_instance_uid=study_uid, status="F", reported_at=now, received_at=now,
            text="No acute haemorrhage.", source="hl7")).inserted_primary_key[0]
        c.execute(insert(ground_truth_labels).values(report_id=report_id, label=CALLED, value=0,
                                                     source="labeller", created_at=now))
    with engine.connect() as c:
        truth = collect_truth(c)[study_uid]
    assert truth.labels == {CALLED: 0} and not truth.partial
