"""Feedback, key image and not-analysed rows on the worklist page, in headless Chromium against the real API
process and real PostgreSQL, end to end: a radiologist agrees with a called finding (with a comment) and disagrees
with the priority by clicking; the verdicts are stored, audited, appear in the fairness report's agreement by group,
and become a label for the nightly job. Screenshots go to test-output/worklist/ (the key image, a not-analysed row).
"""
from __future__ import annotations

import json
import urllib.request

import pytest
import yaml
from sqlalchemy import select

from sql.audit_schema import audit_log, audit_studies
from sql.database import make_engine, upgrade
from sql.feedback_schema import ai_feedback
from tests.support.browser import (  # noqa: F401
    CHROMIUM,
    ROWS,
    SCREENSHOTS,
    SIGN_IN_READY,
    ApiServer,
    Chromium,
    chromium,
    submit_token,
)
from tests.support.processes import free_port
from tests.support.studies import CALLED, analysed_study, not_analysed_study
from train.nightly import collect_truth

pytestmark = pytest.mark.slow

RADIOLOGIST, ADMIN = "radiologist-token-for-feedback", "admin-token-for-feedback"


def clip(browser: Chromium, selector: str) -> dict:
    box = browser.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                           ".getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; })()")
    return {**box, "scale": 1}


def test_feedback_given_on_the_worklist_page_is_stored_audited_reported_by_group_and_becomes_a_label(
        tmp_path, tmp_path_factory, postgres_url, chromium):  # noqa: F811
    from train.phantoms import write_phantom_study

    bleed = write_phantom_study(tmp_path_factory.mktemp("bleed"), lesion="subdural_haemorrhage", seed=11)
    single = write_phantom_study(tmp_path_factory.mktemp("one"), lesion="tumour", seed=3, series=["AX DWI ADC"])
    (tmp_path / "rad").write_text(RADIOLOGIST)
    (tmp_path / "admin").write_text(ADMIN)
    port = free_port()
    config = {"var_dir": str(tmp_path / "var"), "database": {"url": postgres_url},
              "api": {"port": port, "tokens": [
                  {"name": "dr-house", "role": "radiologist", "token_file": str(tmp_path / "rad")},
                  {"name": "ops", "role": "admin", "token_file": str(tmp_path / "admin")}]},
              "worklist": {"poll_interval_s": 1}}
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(config))
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    study_uid, run_id = analysed_study(engine, bleed.files, tmp_path / "sr", sex="F")
    refused_uid = not_analysed_study(engine, single.files[:1])

    api = ApiServer(tmp_path / "triage.yaml", tmp_path / "api.log", port)
    base = api.url

    try:
        api.start()
        chromium.navigate(f"{base}/worklist/login")
        chromium.wait(SIGN_IN_READY, what="the login page, ready")
        submit_token(chromium, RADIOLOGIST)
        chromium.wait(f"{ROWS}.length === 2", what="two studies listed")
        chromium.wait("document.body.dataset.role === 'radiologist' && !!document.querySelector('button.fb')",
                      what="the feedback buttons")
        row = f"#worklist tbody tr[data-study-uid='{study_uid}']"
        refused = f"#worklist tbody tr[data-study-uid='{refused_uid}']"

        # Only the called finding is listed, its probability on one line; demographics are shown.
        text = chromium.evaluate(f"document.querySelector(\"{row}\").innerText")
        assert "Subdural" in text or "subdural" in text
        assert chromium.evaluate(f"document.querySelectorAll(\"{row} ul.findings li\").length") == 1
        assert chromium.evaluate(f"(() => {{ const p = document.querySelector(\"{row} ul.findings .p\"); "
                                 "const range = document.createRange(); range.selectNodeContents(p); "
                                 "return [p.textContent, range.getClientRects().length]; })()") == ["99.9 %", 1]
        assert "Sex " in text and "Age " in text and "exam " in text
        # The not-analysed row says why, and is not "pending".
        refused_text = chromium.evaluate(f"document.querySelector(\"{refused}\").innerText")
        assert "Not analysed" in refused_text and "required sequence 'FLAIR'" in refused_text
        assert "pending" not in refused_text.lower()
        # The key image arrives (fetched with the token) and shows.
        chromium.wait(f"document.querySelector(\"{row} figure.key-image img\")?.naturalWidth >= 384",
                      what="the key image")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        chromium.screenshot(SCREENSHOTS / "5-worklist-key-image.png")
        shot = chromium.send("Page.captureScreenshot", format="png", clip=clip(chromium, refused))
        import base64

        (SCREENSHOTS / "6-not-analysed-row.png").write_bytes(base64.b64decode(shot["data"]))

        chromium.type_into(f"{row} input.comment", "clear acute subdural")
        chromium.evaluate(f"document.querySelector(\"{row} input.comment\")"
                          ".dispatchEvent(new Event('input', {bubbles: true}))")
        chromium.click(f"{row} ul.findings button.fb.agree")
        chromium.wait(f"document.querySelector(\"{row} ul.findings button.fb.agree\")"
                      ".getAttribute('aria-pressed') === 'true'", what="the agreement to be saved")
        assert chromium.evaluate(f"document.querySelector(\"{row} input.comment\").value") == ""  # sent with it
        chromium.click(f"{row} td.priority button.fb.disagree")
        chromium.wait(f"document.querySelector(\"{row} td.priority button.fb.disagree\")"
                      ".getAttribute('aria-pressed') === 'true'", what="the priority disagreement to be saved")
        chromium.screenshot(SCREENSHOTS / "7-feedback-given.png")

        with engine.connect() as c:
            stored = [tuple(r) for r in c.execute(
                select(ai_feedback.c.target, ai_feedback.c.label, ai_feedback.c.verdict, ai_feedback.c.comment,
                       ai_feedback.c.principal, ai_feedback.c.run_id).order_by(ai_feedback.c.id))]
            audited = c.execute(select(audit_log.c.principal, audit_log.c.method, audit_log.c.status_code)
                                .join(audit_studies, audit_studies.c.audit_id == audit_log.c.id)
                                .where(audit_studies.c.study_instance_uid == study_uid,
                                       audit_log.c.path.endswith("/feedback"))).all()
        assert stored == [("finding", CALLED, "agree", "clear acute subdural", "dr-house", run_id),
                          ("priority", "stat", "disagree", None, "dr-house", run_id)]
        assert [tuple(a) for a in audited] == [("dr-house", "POST", 201)] * 2

        # The fairness report (after a refresh) shows agreement by group.
        from train.fairness.cohort import write_cohort_db
        from train.fairness.make_cohort import make_cohort, write_cohort

        write_cohort(make_cohort(studies=200, seed=5), tmp_path / "cohort.csv")
        write_cohort_db(engine, tmp_path / "cohort.csv")
        request = urllib.request.Request(f"{base}/fairness/refresh", method="POST",
                                         headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(request, timeout=300) as response:
            assert response.status == 200
        chromium.navigate(f"{base}/fairness")  # the browser session opened at sign-in
        chromium.wait("!!document.querySelector('#agreement-table')", timeout=60, what="the agreement section")
        cells = chromium.evaluate("[...document.querySelectorAll('#agreement-table tr')]"
                                  ".map(r => [...r.cells].map(c => c.textContent))")
        assert ["sex", "F", "all", "2", "1", "50 %"] in cells
        assert ["sex", "F", "finding", "1", "1", "100 %"] in cells
        assert chromium.evaluate("document.querySelector('#agreement-plot')?.naturalWidth > 0")
        chromium.evaluate("document.querySelector('#agreement').scrollIntoView()")
        chromium.screenshot(SCREENSHOTS / "8-fairness-agreement.png")

        # The nightly job's labels: the agreed finding is present for this study (it has no final report).
        with engine.connect() as c:
            truth = collect_truth(c)[study_uid]
        assert truth.labels == {CALLED: 1} and truth.partial
        assert not [line for line in chromium.console if "Error" in line], chromium.console
    finally:
        api.stop()
        engine.dispose()
