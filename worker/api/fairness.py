"""The fairness report on the web API: the same page as ``triage fairness report``, from the stored results.

``GET /fairness`` renders the latest completed refresh (cached per refresh: rendering the plots takes seconds);
``GET /fairness/results`` gives the findings and tables as JSON; ``POST /fairness/refresh`` (admin) runs a
refresh now instead of waiting for the scheduled one.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select

from pacs_bridge.feedback_schema import ai_feedback
from pacs_bridge.study_attributes import AttributePolicy
from train.fairness.agreement import agreement_by_group, render_agreement_html
from train.fairness.analysis import FairnessConfig, headline
from train.fairness.cohort import load_cohort_db
from train.fairness.metrics import publish
from train.fairness.report import render_html
from train.fairness.store import load_latest, refresh
from worker.api.app import Principal, engine_of, require_role
from worker.api.session import page_role

router = APIRouter(prefix="/fairness", tags=["fairness"])
Reader = Annotated[Principal, Depends(require_role("radiologist", "admin"))]
#: The page itself also opens in a browser signed in on the worklist (worker/api/session.py).
PageReader = Annotated[Principal, Depends(page_role("radiologist", "admin"))]
Admin = Annotated[Principal, Depends(require_role("admin"))]
_render_lock = threading.Lock()


def _latest(request: Request):
    with engine_of(request).connect() as connection:
        results = load_latest(connection)
    if results is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            "no fairness results yet: run `triage fairness refresh` or POST /fairness/refresh")
    return results


@router.get("", response_class=HTMLResponse, summary="The turnaround and fairness report (HTML)")
def fairness_page(request: Request, principal: PageReader) -> HTMLResponse:
    results = _latest(request)
    state = request.app.state
    with engine_of(request).connect() as connection:
        # Feedback arrives between refreshes: its section is redrawn whenever a verdict was added.
        key = (results.refresh_id, connection.execute(select(func.max(ai_feedback.c.id))).scalar())
    with _render_lock:  # one rendering at a time; later requests for the same refresh get the cached page
        cached = getattr(state, "fairness_page", None)
        if cached is None or cached[0] != key:
            with engine_of(request).connect() as connection:
                cohort = load_cohort_db(connection)
                agreement = render_agreement_html(agreement_by_group(connection))
            page = render_html(results, cohort)
            state.fairness_page = (key, page.replace("</body></html>", agreement + "\n</body></html>"))
        page = state.fairness_page[1]
    return HTMLResponse(page)


@router.get("/results", summary="The latest fairness results as JSON")
def fairness_results(request: Request, principal: Reader, tables: bool = False) -> dict:
    results = _latest(request)
    body = {"refresh_id": results.refresh_id, "finished_at": results.finished_at, "source": results.source,
            **headline(results)}
    if tables:
        with engine_of(request).connect() as connection:
            body["agreement"] = [{**asdict(row), "share": row.share} for row in agreement_by_group(connection)]
        body["odds"] = [asdict(row) for row in results.odds]
        body["disparities"] = [{k: v for k, v in asdict(row).items() if not k.startswith("bootstrap_")}
                               for row in results.disparities]
        body["summaries"] = [asdict(row) for row in results.summaries]
    return body


@router.post("/refresh", summary="Refresh the fairness results now")
def fairness_refresh(request: Request, principal: Admin) -> dict:
    fairness = request.app.state.settings.fairness.model_dump()
    results = refresh(engine_of(request), FairnessConfig.from_settings(fairness),
                      AttributePolicy.from_settings(fairness))
    publish(results, time.time())
    return {"refresh_id": results.refresh_id, **headline(results)}
