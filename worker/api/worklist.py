"""The radiologists' worklist: studies in reading order (AI priority, then time waiting), as JSON and as a
page.

The page (``GET /worklist/``, static HTML and JavaScript under ``worker/api/static/worklist``, no build step)
logs in with a bearer token kept in the browser's sessionStorage and polls ``GET /worklist/items`` with the
ETag of what it shows, so it updates without a reload and an unchanged list costs a 304. Every data route
needs a radiologist or admin token; the pages and their assets carry no data and are served to anyone, which
keeps the login replaceable (``worklist.login``; the page reads ``GET /worklist/config`` to choose its login).

Reading order: ``stat`` before ``urgent`` before ``routine``; studies the AI has not finished, failed on or did
not analyse (the input gate turned them away, ``worker.input_gate``: the row says why) rank with routine, since
they still have to be read; within a level, the longest-waiting first.

The summary lists only the findings the AI called (present: at or above threshold); the study page lists all.
Demographics and exam time are shown to the roles in ``DEMOGRAPHICS_ROLES``; the bookkeeping keeps patient sex and
age only (never names or IDs, DESIGN.md), so that is all a row can show. A radiologist agrees or disagrees with
each called finding and the priority (``feedback.py``); the key image (``key_image.py``) shows the regions that
drove each called finding. Studies with a
final report leave the list (``worklist.hide_reported``), as do studies no pipeline processes (``ignored``).
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel, Field
from sqlalchemy import and_, func, or_, select

from pacs_bridge.codes import DIAGNOSIS_CODES, REFERRAL_CODES, SIMILAR_PRIOR_STUDY, SIMILAR_STUDY
from pacs_bridge.results import PRIORITIES
from sql.report_schema import reports, study_attributes
from sql.schema import as_utc, deliveries, events, instances, predictions, processing_runs, studies
from worker.api.dependencies import current_principal, engine_of, require_role
from worker.api.feedback import current_verdicts
from worker.api.feedback import router as feedback_router
from worker.api.key_image import FindingRegions, key_instance, render_key_image
from worker.api.tokens import Principal

router = APIRouter(prefix="/worklist", tags=["worklist"])
Reader = Annotated[Principal, Depends(require_role("radiologist", "admin"))]
#: A Study Instance UID in a path: digits and dots (anything else could not name a study, and a NUL would reach
#: the database).
StudyUID = Annotated[str, PathParam(max_length=64, pattern=r"^[0-9.]+$")]

STATIC = Path(__file__).resolve().parent / "static" / "worklist"
ASSETS = {"worklist.js": "text/javascript", "study.js": "text/javascript", "auth.js": "text/javascript",
          "format.js": "text/javascript", "worklist.css": "text/css"}
PAGES = {"": "index.html", "login": "login.html", "study": "study.html"}
TOP_FINDINGS = 3
#: Roles that see patient sex, age and exam time on the worklist (administrators run the service, they do not
#: read studies).
DEMOGRAPHICS_ROLES = ("radiologist",)
_RANK = {p: i for i, p in enumerate(PRIORITIES)}


# --- what the API returns ----------------------------------------------------------------------------------

class FindingOut(BaseModel):
    label: str = Field(..., description="the model's diagnosis label")
    name: str = Field(..., description="a readable name (the code meaning for labels with a standard code)")
    probability: float = Field(..., ge=0, le=1)
    threshold: float | None = Field(None, description="the operating point: positive from here up")
    positive: bool


class PriorityChangeOut(BaseModel):
    publisher: str
    kind: str
    target: str
    action: str = Field(..., description="raised | created | reverted | notified")
    original: str | None = Field(None, description="the value the target held before")
    new: str | None


class LinksOut(BaseModel):
    detail: str = Field(..., description="the study's page on this worklist")
    sr: str | None = Field(None, description="the AI result as a DICOM SR (GET with the bearer token)")
    viewer: str | None = Field(None, description="the study in the image viewer (worklist.viewer_url)")
    key_image: str | None = Field(None, description="PNG of the key slice with the findings' regions (GET with the "
                                                    "bearer token; 404 when the SR marks no region)")


class WorklistItem(BaseModel):
    study_instance_uid: str
    accession_number: str | None
    study_description: str | None
    modalities: str | None
    study_status: str = Field(..., description="receiving | queued | processing | done | failed")
    ai_status: str = Field(..., description="done: an AI result exists; pending: not yet; failed: no result; "
                                            "not_analysed: the input gate turned the study away")
    not_analysed_reasons: list[str] = Field(default_factory=list,
                                            description="why the AI did not analyse the study (ai_status "
                                                        "not_analysed)")
    priority: str | None = Field(None, description="the AI's priority: routine | urgent | stat")
    priority_rank: int = Field(..., description="reading order key: 2 stat, 1 urgent, 0 routine or no result")
    findings: list[FindingOut] = Field(..., description=f"the top {TOP_FINDINGS} called findings (present: at or "
                                                        "above threshold); on the study page every reported one")
    patient_sex: str | None = Field(None, description="as the study's images give it (M, F, O); only for "
                                                      "DEMOGRAPHICS_ROLES")
    patient_age: str | None = Field(None, description="DICOM PatientAge (e.g. 067Y); only for DEMOGRAPHICS_ROLES")
    exam_at: datetime | None = Field(None, description="when the examination took place (UTC); only for "
                                                       "DEMOGRAPHICS_ROLES")
    demographics: bool = Field(False, description="whether this principal may see demographics and exam time")
    feedback: dict[str, str] = Field(default_factory=dict,
                                     description="this principal's current verdicts: 'priority' or "
                                                 "'finding:<label>' -> agree | disagree")
    referrals: list[str]
    waiting_since: datetime = Field(..., description="when the study's first images arrived (UTC)")
    processed_at: datetime | None = None
    model: str | None = None
    similar_studies: int = Field(0, description="how many similar prior studies the SR cites as evidence")
    priority_changes: list[PriorityChangeOut] = Field(
        default_factory=list, description="what the publishers changed in other systems")
    links: LinksOut


class WorklistOut(BaseModel):
    generated_at: datetime
    poll_interval_s: float
    items: list[WorklistItem]


class SimilarStudyOut(BaseModel):
    study_instance_uid: str
    similarity: float
    findings: list[str]
    on_worklist: bool = Field(..., description="whether this worklist knows the study (links.detail works)")
    links: LinksOut | None = None


class PublicationOut(BaseModel):
    event_id: int
    at: datetime
    publisher: str | None
    kind: str | None
    target: str | None
    action: str | None
    original: str | None
    new: str | None
    reason: str


class StudyDetailOut(BaseModel):
    item: WorklistItem
    all_findings: list[FindingOut] = Field(..., description="every reported diagnosis, most probable first")
    priority_scores: dict[str, float] = Field(..., description="the model's priority classes, probabilities")
    referral_scores: dict[str, float]
    similar_studies: list[SimilarStudyOut]
    regions: dict[str, int] = Field(..., description="per finding, how many image regions the SR marks")
    publications: list[PublicationOut]
    deliveries: list[dict[str, Any]]


class PrincipalOut(BaseModel):
    name: str
    role: str


class PageConfigOut(BaseModel):
    login: str = Field(..., description="token (a bearer token typed on the login page) or oidc")
    oidc: dict[str, str] = Field(default_factory=dict)
    poll_interval_s: float


# --- reading the database ----------------------------------------------------------------------------------

def finding_name(label: str) -> str:
    """The code meaning for standard codes; for private ones the label without its category, in words."""
    row = DIAGNOSIS_CODES.get(label)
    if row is not None and row[2] != label:
        return row[2]
    words = label.split("_")[1:] or [label]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def referral_name(name: str) -> str:
    row = REFERRAL_CODES.get(name)
    return row[2] if row else name.replace("_", " ")


@lru_cache(maxsize=2048)
def _sr_evidence(path: str, mtime_ns: int) -> tuple[tuple[tuple[str, float, tuple[str, ...]], ...],
                                                     tuple[tuple[str, int], ...]]:
    """Similar studies and region counts from one SR file (cached by path and modification time)."""
    from pacs_bridge.sr import read_sr

    result = read_sr(pydicom.dcmread(path))
    # The SR names similar studies by pseudonymous reference (another patient's); study_detail resolves them.
    similar = tuple((s.study_instance_uid or s.reference, s.similarity, tuple(s.findings))
                    for s in result.similar_studies)
    regions = tuple((f.label, len(f.regions)) for f in result.findings)
    return similar, regions


@lru_cache(maxsize=16384)
def _similar_count(path: str, mtime_ns: int) -> int:
    """How many similar-study items an SR holds: a plain walk of its content tree, ten times cheaper than
    reading it back, because the list asks for every row."""
    ds = pydicom.dcmread(path, specific_tags=["ContentSequence"])
    count, stack = 0, list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        names = item.get("ConceptNameCodeSequence")
        if names and (names[0].get("CodeValue"), names[0].get("CodingSchemeDesignator")) == \
                (SIMILAR_STUDY.value, SIMILAR_STUDY.scheme_designator):
            count += 1
        values = item.get("ConceptCodeSequence")  # a similar study's measurement group: its Finding
        if values and (values[0].get("CodeValue"), values[0].get("CodingSchemeDesignator")) == \
                (SIMILAR_PRIOR_STUDY.value, SIMILAR_PRIOR_STUDY.scheme_designator):
            count += 1
        stack.extend(item.get("ContentSequence", []))
    return count


_sr_lock = threading.Lock()


def _cached(reader, path: str | None, empty):
    if not path:
        return empty
    try:
        mtime = Path(path).stat().st_mtime_ns
    except OSError:
        return empty
    with _sr_lock:
        try:
            return reader(path, mtime)
        except Exception:  # an unreadable SR must not take the worklist down; the detail page says so
            return empty


def sr_evidence(path: str | None):
    """Similar studies and region counts of the SR at ``path``; empty if it cannot be read."""
    return _cached(_sr_evidence, path, ((), ()))


def similar_count(path: str | None) -> int:
    return _cached(_similar_count, path, 0)


class WorklistReader:
    """Builds worklist rows from the bookkeeping tables."""

    def __init__(self, request: Request) -> None:
        self.engine = engine_of(request)
        self.settings = request.app.state.settings.worklist

    def _links(self, study_uid: str, accession: str | None, sr_path: str | None) -> LinksOut:
        viewer = self.settings.viewer_url
        return LinksOut(
            detail=f"study?uid={study_uid}",
            sr=f"studies/{study_uid}/sr" if sr_path else None,
            key_image=f"studies/{study_uid}/key-image.png" if sr_path else None,
            viewer=viewer.format(study_uid=study_uid, accession=accession or "") if viewer else None,
        )

    def rows(self, study_uid: str | None = None, principal: Principal | None = None) -> list[dict[str, Any]]:
        latest = (select(processing_runs.c.study_id, func.max(processing_runs.c.id).label("run_id"),
                         func.min(processing_runs.c.last_image_at).label("first_run_image_at"))
                  .group_by(processing_runs.c.study_id).subquery())
        query = (select(studies, latest.c.run_id, latest.c.first_run_image_at,
                        processing_runs.c.status.label("run_status"), processing_runs.c.priority,
                        processing_runs.c.finished_at, processing_runs.c.model_name,
                        processing_runs.c.model_version, processing_runs.c.sr_path,
                        processing_runs.c.error.label("run_error"), study_attributes.c.exam_at)
                 .select_from(studies.outerjoin(latest, latest.c.study_id == studies.c.id)
                              .outerjoin(processing_runs, processing_runs.c.id == latest.c.run_id)
                              .outerjoin(study_attributes,
                                         study_attributes.c.study_instance_uid == studies.c.study_instance_uid))
                 .where(studies.c.status != "ignored"))
        if study_uid is not None:  # one study, as linked: shown whatever its age or report
            query = query.where(studies.c.study_instance_uid == study_uid)
        if study_uid is None and float(self.settings.max_age_days) > 0:
            cutoff = datetime.now(UTC) - timedelta(days=float(self.settings.max_age_days))
            query = query.where(studies.c.last_received_at >= cutoff)
        if study_uid is None and self.settings.hide_reported:
            final = reports.c.status.in_(("F", "C"))
            reported = select(reports.c.id).where(and_(final, or_(
                reports.c.study_instance_uid == studies.c.study_instance_uid,
                and_(studies.c.accession_number.is_not(None),
                     reports.c.accession_number == studies.c.accession_number))))
            query = query.where(~reported.exists())
        with self.engine.connect() as connection:
            rows = [dict(r._mapping) for r in connection.execute(query)]
            run_ids = [r["run_id"] for r in rows if r["run_id"] is not None]
            found = defaultdict(list)
            changes = defaultdict(list)
            verdicts = current_verdicts(connection, run_ids, principal.name) if principal is not None else {}
            if run_ids:
                for p in connection.execute(
                        select(predictions).where(and_(predictions.c.run_id.in_(run_ids),
                                                       predictions.c.kind.in_(("diagnosis", "referral")),
                                                       predictions.c.reported == 1))):
                    found[p.run_id].append(p)
                uids = [r["study_instance_uid"] for r in rows]
                for e in connection.execute(
                        select(events.c.study_instance_uid, events.c.detail)
                        .where(and_(events.c.kind == "publication", events.c.study_instance_uid.in_(uids)))
                        .order_by(events.c.id)):
                    detail = e.detail or {}
                    if detail.get("action") in ("raised", "created", "reverted", "notified"):
                        changes[e.study_instance_uid].append(detail)
        for row in rows:
            predicted = found.get(row["run_id"], [])
            row["findings"] = sorted((p for p in predicted if p.kind == "diagnosis"),
                                     key=lambda p: p.probability, reverse=True)
            row["referrals"] = sorted(p.label for p in predicted if p.kind == "referral")
            row["changes"] = changes.get(row["study_instance_uid"], [])
            row["verdicts"] = verdicts.get(row["run_id"], {})
        return rows

    def item(self, row: dict[str, Any], top: int | None = TOP_FINDINGS, count_similar: bool = True,
             principal: Principal | None = None) -> WorklistItem:
        run_status = row.get("run_status")
        ai_status = "done" if run_status == "done" and row.get("priority") else \
            "not_analysed" if run_status == "not_analysed" else \
            "failed" if run_status == "failed" or row["status"] == "failed" else "pending"
        priority = row.get("priority") if ai_status == "done" else None
        since = [t for t in (as_utc(row["first_received_at"]), as_utc(row.get("first_run_image_at"))) if t]
        # The summary shows what the AI called; a probability below threshold is not a finding.
        findings = [p for p in row["findings"] if _called(p)][:top] if top else row["findings"]
        shown = principal is not None and principal.role in DEMOGRAPHICS_ROLES
        return WorklistItem(
            study_instance_uid=row["study_instance_uid"], accession_number=row["accession_number"],
            study_description=row["study_description"], modalities=row["modalities"],
            study_status=row["status"], ai_status=ai_status, priority=priority,
            priority_rank=_RANK.get(priority, 0),
            findings=[FindingOut(label=p.label, name=finding_name(p.label), probability=p.probability,
                                 threshold=p.threshold,
                                 positive=_called(p))
                      for p in findings],
            not_analysed_reasons=not_analysed_reasons(row.get("run_error")) if ai_status == "not_analysed" else [],
            patient_sex=row.get("patient_sex") if shown else None,
            patient_age=row.get("patient_age") if shown else None,
            exam_at=exam_time(row) if shown else None, demographics=shown,
            feedback=row.get("verdicts", {}) if ai_status == "done" else {},
            referrals=[referral_name(r) for r in row["referrals"]],
            waiting_since=min(since), processed_at=as_utc(row.get("finished_at")),
            model=" ".join(filter(None, (row.get("model_name"), row.get("model_version")))) or None,
            similar_studies=similar_count(row.get("sr_path")) if ai_status == "done" and count_similar else 0,
            priority_changes=[PriorityChangeOut(**{k: d.get(k) for k in PriorityChangeOut.model_fields})
                              for d in row["changes"]],
            links=self._links(row["study_instance_uid"], row["accession_number"],
                              row.get("sr_path") if ai_status == "done" else None),
        )


def _called(p) -> bool:
    return p.threshold is None or p.probability >= p.threshold


NOT_ANALYSED_PREFIX = "not analysed: "


def not_analysed_reasons(error: str | None) -> list[str]:
    """The input gate's reasons as the pipeline records them in the run's error ("not analysed: a; b")."""
    text = (error or "").strip()
    text = text.removeprefix(NOT_ANALYSED_PREFIX)
    return [r.strip() for r in text.split("; ") if r.strip()] or ["the input gate turned the study away"]


def exam_time(row: dict[str, Any]) -> datetime | None:
    """The examination time: from the study's attributes (StudyDate/StudyTime or HL7 OBR-7, in UTC), else the
    StudyDate alone (midnight UTC; the page then shows the date only)."""
    if row.get("exam_at") is not None:
        return as_utc(row["exam_at"])
    text = row.get("study_date") or ""
    try:
        return datetime.strptime(text, "%Y%m%d").replace(tzinfo=UTC) if len(text) == 8 else None
    except ValueError:
        return None


def reading_order(items: list[WorklistItem]) -> list[WorklistItem]:
    return sorted(items, key=lambda i: (-i.priority_rank, i.waiting_since, i.study_instance_uid))


# --- JSON routes -------------------------------------------------------------------------------------------

@router.get("/config", response_model=PageConfigOut,
            summary="How the worklist page logs in and how often it polls")
def page_config(request: Request) -> PageConfigOut:
    settings = request.app.state.settings.worklist
    oidc = {k: str(v) for k, v in settings.oidc.model_dump().items()} if settings.login == "oidc" else {}
    return PageConfigOut(login=settings.login, oidc=oidc,
                         poll_interval_s=float(settings.poll_interval_s))


@router.get("/me", response_model=PrincipalOut, summary="Who the bearer token belongs to (the login check)")
def me(principal: Annotated[Principal, Depends(current_principal)]) -> PrincipalOut:
    return PrincipalOut(name=principal.name, role=principal.role)


@router.get("/items", response_model=WorklistOut, summary="The worklist in reading order",
            responses={304: {"description": "unchanged since the ETag sent in If-None-Match"}})
def worklist_items(request: Request, response: Response, principal: Reader) -> WorklistOut | Response:
    """Studies ordered by AI priority (stat, urgent, routine), then by time waiting (longest first).

    Send the last response's ``ETag`` as ``If-None-Match``: an unchanged worklist answers 304 with no body.
    """
    reader = WorklistReader(request)
    rows = {row["study_instance_uid"]: row for row in reader.rows(principal=principal)}
    items = reading_order([reader.item(row, count_similar=False, principal=principal) for row in rows.values()])
    items = items[:int(reader.settings.max_rows)]
    for item in items:  # only for the rows shown: counting reads the SR file (cached afterwards)
        if item.ai_status == "done":
            item.similar_studies = similar_count(rows[item.study_instance_uid].get("sr_path"))
    body = [item.model_dump(mode="json") for item in items]
    etag = '"' + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32] + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    response.headers["ETag"] = etag
    response.headers["Cache-Control"] = "no-cache"
    return WorklistOut(generated_at=datetime.now(UTC),
                       poll_interval_s=float(reader.settings.poll_interval_s), items=items)


def _study_row(reader: WorklistReader, study_uid: str, principal: Principal | None = None) -> dict[str, Any]:
    rows = reader.rows(study_uid, principal)
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study {study_uid} on this worklist")
    return rows[0]


@router.get("/studies/{study_uid}", response_model=StudyDetailOut,
            summary="One study's AI result and evidence")
def study_detail(study_uid: StudyUID, request: Request, principal: Reader) -> StudyDetailOut:
    reader = WorklistReader(request)
    row = _study_row(reader, study_uid, principal)
    item = reader.item(row, top=None, principal=principal)
    similar, regions = sr_evidence(row.get("sr_path")) if item.ai_status == "done" else ((), ())
    from worker.slice_evidence import resolve_study_references

    resolved = resolve_study_references(request.app.state.settings, reader.engine, [s[0] for s in similar])
    similar = tuple((resolved.get(ref, ref), similarity, found) for ref, similarity, found in similar)
    with reader.engine.connect() as connection:
        scores = connection.execute(select(predictions.c.kind, predictions.c.label, predictions.c.probability)
                                    .where(and_(predictions.c.run_id == row["run_id"],
                                                predictions.c.kind.in_(("priority", "referral"))))).all() \
            if row["run_id"] else []
        known = set(connection.execute(select(studies.c.study_instance_uid).where(
            studies.c.study_instance_uid.in_([s[0] for s in similar]))).scalars()) if similar else set()
        accessions = dict(connection.execute(
            select(studies.c.study_instance_uid, studies.c.accession_number)
            .where(studies.c.study_instance_uid.in_(known))).all()) if known else {}
        published = connection.execute(
            select(events)
            .where(and_(events.c.kind == "publication", events.c.study_instance_uid == study_uid))
            .order_by(events.c.id)).all()
        sent = connection.execute(select(deliveries.c.destination, deliveries.c.status, deliveries.c.attempts,
                                         deliveries.c.delivered_at, deliveries.c.last_error)
                                  .where(deliveries.c.run_id == row["run_id"])).all() if row["run_id"] else []
    return StudyDetailOut(
        item=item,
        all_findings=item.findings,
        priority_scores={s.label: s.probability for s in scores if s.kind == "priority"},
        referral_scores={s.label: s.probability for s in scores if s.kind == "referral"},
        similar_studies=[SimilarStudyOut(study_instance_uid=uid, similarity=similarity, findings=list(found),
                                         on_worklist=uid in known,
                                         links=reader._links(uid, accessions.get(uid), None))
                         for uid, similarity, found in similar],
        regions=dict(regions),
        publications=[PublicationOut(event_id=e.id, at=as_utc(e.at), reason=e.reason,
                                     **{k: (e.detail or {}).get(k) for k in
                                        ("publisher", "kind", "target", "action", "original", "new")})
                      for e in published],
        deliveries=[{"destination": d.destination, "status": d.status, "attempts": d.attempts,
                     "delivered_at": as_utc(d.delivered_at), "last_error": d.last_error} for d in sent],
    )


@router.get("/studies/{study_uid}/sr", summary="The study's AI result as a DICOM SR file",
            response_class=FileResponse, responses={200: {"content": {"application/dicom": {}}}})
def study_sr(study_uid: StudyUID, request: Request, principal: Reader) -> FileResponse:
    row = _study_row(WorklistReader(request), study_uid)
    path = row.get("sr_path")
    if not path or not Path(path).is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_uid} has no SR yet")
    return FileResponse(path, media_type="application/dicom", filename=f"{Path(path).stem}.dcm")


@lru_cache(maxsize=512)
def _sr_regions(path: str, mtime_ns: int) -> tuple[tuple[str, tuple[tuple[str, tuple, float], ...]], ...]:
    from pacs_bridge.sr import read_sr

    result = read_sr(pydicom.dcmread(path))
    return tuple((f.label, tuple((r.sop_instance_uid, tuple(r.polygon), r.weight) for r in f.regions))
                 for f in result.findings if f.positive and f.regions)


@router.get("/studies/{study_uid}/key-image.png", summary="The key image: a source slice with the regions that "
            "drove each called finding (PNG)", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "no result or no region"}})
def study_key_image(study_uid: StudyUID, request: Request, principal: Reader) -> Response:
    reader = WorklistReader(request)
    row = _study_row(reader, study_uid)
    if row.get("run_status") != "done":
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_uid} has no AI result")
    regions = _cached(_sr_regions, row.get("sr_path"), ())
    findings = [FindingRegions(finding_name(label), found) for label, found in regions]
    uid = key_instance(findings)
    if uid is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the SR of study {study_uid} marks no region")
    with reader.engine.connect() as connection:
        path = connection.execute(select(instances.c.path).where(instances.c.sop_instance_uid == uid)).scalar()
    if not path or not Path(path).is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the key image {uid} is not in the store")
    png = render_key_image(Path(path), uid, findings)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


router.include_router(feedback_router)


# --- the page ----------------------------------------------------------------------------------------------

def _page(name: str) -> HTMLResponse:
    return HTMLResponse((STATIC / name).read_text(), headers={"Cache-Control": "no-cache"})


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def worklist_page() -> HTMLResponse:
    return _page(PAGES[""])


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page() -> HTMLResponse:
    return _page(PAGES["login"])


@router.get("/study", response_class=HTMLResponse, include_in_schema=False)
def study_page() -> HTMLResponse:
    return _page(PAGES["study"])


@router.get("/assets/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: nothing else under the folder, and no path from the URL
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no asset {name}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
