"""Final radiology reports over HTTP: the alternative to HL7 ORU for systems that speak JSON.

``POST /reports`` stores the report exactly as an accepted ORU^R01 would be stored (``pacs_bridge.report_intake``):
the report row, the study's attributes, and the labels the report labeller reads from the text. A resend with the
same ``message_id`` returns the stored report instead of a second copy.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi import Path as PathParam
from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy import select

from models.labeller import default_labeller
from pacs_bridge.report_intake import FinalReport, ReportValidationError, store_report
from pacs_bridge.study_attributes import AttributePolicy, StudyAttributes, normalise_sex
from sql.report_schema import ground_truth_labels, reports
from worker.api.dependencies import engine_of, require_role
from worker.api.tokens import Principal

router = APIRouter(prefix="/reports", tags=["reports"])
#: Radiologists sign reports, integrations post them with an admin token; both may read them back.
Reader = Annotated[Principal, Depends(require_role("radiologist", "admin"))]
#: 422 under its current name (Starlette renamed it; older versions only have the old one).
UNPROCESSABLE = getattr(status, "HTTP_422_UNPROCESSABLE_CONTENT", 422)
#: reports.id is a 32-bit integer column: a larger number is a 422, not an overflow inside the database driver.
MAX_ID = 2 ** 31 - 1


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


#: Text as stored: PostgreSQL's text columns cannot hold NUL, so it is refused here (422) rather than there (500).
Text = Annotated[str, AfterValidator(_no_nul)]


class PatientGroups(BaseModel):
    """What the sender knows of the patient; reduced to groups on arrival, never stored as given."""

    sex: Text | None = Field(None, description="F, M, O or U (DICOM/HL7 codes)")
    age_years: float | None = Field(None, ge=0, le=150, description="age at the examination")
    ethnic_group: Text | None = None
    postcode: Text | None = Field(None, description="looked up in the postcode table, then discarded")
    insurance_class: Text | None = None


class ReportIn(BaseModel):
    text: Text = Field(..., min_length=1, description="the report text (findings and impression)")
    reported_at: datetime = Field(..., description="when the report was signed; local time if no offset")
    accession_number: Text | None = Field(None, max_length=64)
    study_instance_uid: Text | None = Field(None, max_length=64)
    exam_at: datetime | None = Field(None, description="when the examination took place")
    status: Text = Field("F", description="HL7 result status: F final, C corrected, P preliminary")
    message_id: Text | None = Field(None, max_length=64, description="the sender's ID, so a resend is not stored twice")
    patient: PatientGroups | None = None


class LabelOut(BaseModel):
    label: str
    value: int


class ReportOut(BaseModel):
    report_id: int
    study_instance_uid: str | None
    duplicate: bool = False
    labels: list[LabelOut]


def _attribute_policy(request: Request) -> AttributePolicy:
    state = request.app.state
    if getattr(state, "attribute_policy", None) is None:
        state.attribute_policy = AttributePolicy.from_settings(state.settings.fairness.model_dump())
    return state.attribute_policy


def _labeller(request: Request):
    state = request.app.state
    if getattr(state, "report_labeller", None) is None:
        state.report_labeller = default_labeller()
    return state.report_labeller


def _given(value: str | None) -> str | None:
    """A blank identifier is no identifier: "" must not become a message ID that every blank resend shares."""
    return (value or "").strip() or None


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ReportOut,
             summary="Store a final report and label it")
def post_report(body: ReportIn, request: Request, principal: Reader) -> ReportOut:
    policy = _attribute_policy(request)
    reported_at, exam_at = policy.local_to_utc(body.reported_at), \
        policy.local_to_utc(body.exam_at) if body.exam_at else None
    attrs = StudyAttributes(exam_at=exam_at)
    patient = body.patient or PatientGroups()
    attrs.set("sex", normalise_sex(patient.sex), "http")
    attrs.set("age_band", policy.age_band(patient.age_years), "http")
    attrs.set("ethnic_group", (patient.ethnic_group or "").strip().lower(), "http")
    attrs.set("insurance_class", (patient.insurance_class or "").strip().lower(), "http")
    attrs.set("scheduling", policy.scheduling(exam_at), "http")
    if patient.postcode and policy.postcodes is not None:
        region, density = policy.postcodes.lookup(patient.postcode)
        attrs.set("region", region, "http")
        attrs.set("density_quartile", density, "http")
    try:
        report = FinalReport(text=body.text, reported_at=reported_at, exam_at=exam_at, status=body.status.upper(),
                             accession_number=_given(body.accession_number),
                             study_instance_uid=_given(body.study_instance_uid),
                             source="http", source_message_id=_given(body.message_id), attributes=attrs)
    except ReportValidationError as exc:
        raise HTTPException(UNPROCESSABLE, str(exc)) from exc
    with engine_of(request).begin() as connection:
        stored = store_report(connection, report, _labeller(request))
    return ReportOut(report_id=stored.report_id, study_instance_uid=stored.study_instance_uid,
                     duplicate=stored.duplicate, labels=[LabelOut(label=l, value=v) for l, v in stored.labels])


@router.get("/{report_id}", summary="A stored report with its labels")
def get_report(report_id: Annotated[int, PathParam(ge=1, le=MAX_ID)], request: Request, principal: Reader) -> dict:
    with engine_of(request).connect() as connection:
        row = connection.execute(select(reports).where(reports.c.id == report_id)).first()
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no report {report_id}")
        labels = connection.execute(select(ground_truth_labels.c.label, ground_truth_labels.c.value,
                                           ground_truth_labels.c.source, ground_truth_labels.c.evidence)
                                    .where(ground_truth_labels.c.report_id == report_id)
                                    .order_by(ground_truth_labels.c.id)).mappings().all()
    report = {key: (value.isoformat() if isinstance(value, datetime) else value)
              for key, value in row._mapping.items()}
    return {**report, "labels": [dict(label) for label in labels]}
