"""Radiologists' feedback on the AI's result, given on the worklist page: agree or disagree with a called finding
or with the priority, with an optional comment (IHE AI Results accept / reject; ``sql.feedback_schema``).

``POST /worklist/studies/{study_uid}/feedback`` records one verdict on the study's latest AI result. Only a
radiologist may give it (an administrator runs the service, a sender sends images: neither reads studies), and
only on what the AI actually said: a finding it called (present, at or above threshold) or the priority it gave.
The audit middleware logs the request with the study, like every change; the row itself names who said what.
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from sqlalchemy import and_, func, insert, select
from sqlalchemy.engine import Connection

from sql.feedback_schema import MAX_COMMENT, ai_feedback
from sql.schema import as_utc, predictions, processing_runs, studies, utcnow
from worker.api.dependencies import engine_of, require_role
from worker.api.tokens import Principal

router = APIRouter(tags=["worklist"])
#: Who may judge the AI's result: the people who read the studies.
FEEDBACK_ROLES = ("radiologist",)
Radiologist = Annotated[Principal, Depends(require_role(*FEEDBACK_ROLES))]
StudyUID = Annotated[str, PathParam(max_length=64, pattern=r"^[0-9.]+$")]


class FeedbackIn(BaseModel):
    target: Literal["finding", "priority"] = Field(..., description="what is judged")
    label: str = Field(..., min_length=1, max_length=96,
                       description="the finding's diagnosis label, or the AI's priority for target priority")
    verdict: Literal["agree", "disagree"] = Field(..., description="IHE AIR accept (agree) or reject (disagree)")
    comment: str | None = Field(None, max_length=MAX_COMMENT, pattern=r"^[^\x00]*$")


class FeedbackOut(BaseModel):
    id: int
    study_instance_uid: str
    run_id: int
    target: str
    label: str
    ai_value: str
    verdict: str
    comment: str | None
    principal: str
    created_at: datetime


def feedback_key(target: str, label: str) -> str:
    """How the page names a judged target: ``finding:<label>`` or ``priority``."""
    return "priority" if target == "priority" else f"{target}:{label}"


def current_verdicts(connection: Connection, run_ids: list[int], principal: str) -> dict[int, dict[str, str]]:
    """Per run, ``principal``'s latest verdict on each target (a later row supersedes an earlier one)."""
    if not run_ids:
        return {}
    latest = (select(func.max(ai_feedback.c.id))
              .where(and_(ai_feedback.c.run_id.in_(run_ids), ai_feedback.c.principal == principal))
              .group_by(ai_feedback.c.run_id, ai_feedback.c.target, ai_feedback.c.label))
    found: dict[int, dict[str, str]] = defaultdict(dict)
    for row in connection.execute(select(ai_feedback.c.run_id, ai_feedback.c.target, ai_feedback.c.label,
                                         ai_feedback.c.verdict).where(ai_feedback.c.id.in_(latest))):
        found[row.run_id][feedback_key(row.target, row.label)] = row.verdict
    return found


@router.post("/studies/{study_uid}/feedback", response_model=FeedbackOut, status_code=status.HTTP_201_CREATED,
             summary="Agree or disagree with the AI's finding or priority (radiologists)")
def give_feedback(study_uid: StudyUID, body: FeedbackIn, request: Request, principal: Radiologist) -> FeedbackOut:
    """Judged is the study's latest AI result: 409 if it has none, 422 if the finding was not called (or the
    priority is not the one the AI gave), so a verdict always refers to something the radiologist saw."""
    with engine_of(request).begin() as connection:
        run = connection.execute(
            select(processing_runs.c.id, processing_runs.c.status, processing_runs.c.priority)
            .select_from(processing_runs.join(studies, studies.c.id == processing_runs.c.study_id))
            .where(studies.c.study_instance_uid == study_uid)
            .order_by(processing_runs.c.id.desc()).limit(1)).first()
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study {study_uid} with an AI run")
        if run.status != "done" or not run.priority:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"study {study_uid} has no AI result to judge (run status {run.status})")
        if body.target == "priority":
            if body.label != run.priority:
                raise HTTPException(422, f"the AI's priority for study {study_uid} is {run.priority!r}, "
                                         f"not {body.label!r}")
            ai_value = run.priority
        else:
            called = connection.execute(select(predictions.c.id).where(and_(
                predictions.c.run_id == run.id, predictions.c.kind == "diagnosis",
                predictions.c.label == body.label, predictions.c.reported == 1,
                (predictions.c.threshold.is_(None)) | (predictions.c.probability >= predictions.c.threshold)))
            ).first()
            if called is None:
                raise HTTPException(422, f"the AI did not call {body.label!r} in study {study_uid}: only called "
                                         "findings can be judged")
            ai_value = "present"
        comment = (body.comment or "").strip() or None
        row = {"study_instance_uid": study_uid, "run_id": run.id, "target": body.target, "label": body.label,
               "ai_value": ai_value, "verdict": body.verdict, "comment": comment, "principal": principal.name,
               "role": principal.role, "created_at": utcnow()}
        row_id = connection.execute(insert(ai_feedback).values(**row)).inserted_primary_key[0]
    return FeedbackOut(id=row_id, **{**row, "created_at": as_utc(row["created_at"])})
