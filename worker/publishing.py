"""Publishing a run's AI priority to the worklist systems, and the record of what was changed.

``publish_run`` is the ``triage.publish`` task's work (worker/tasks.py), queued by the pipeline once a run's
predictions are recorded, on the delivery queue: never inside the GPU task. Publishers that could not be reached
are tried again under the delivery retry policy (``delivery.*``) and then dead-lettered: an ``events`` row of kind
``dead_letter`` that ``triage publications`` lists first, and ``triage publications retry`` publishes again.
``publish_result`` publishes a result in hand, now. Each configured publisher
(``publishers`` in the configuration; :mod:`pacs_bridge.publishers`) gets the study's priority; each decision
is written as an ``events`` row of kind ``publication`` whose ``detail`` holds the publisher, the target
(workitem, resource, order), the action (raised, unchanged, skipped, notified, failed...), the value found
there (``original``), the value set (``new``) and the AI's reason. That record is what ``triage publications
revert`` uses to put the original value back. Nothing here ever fails the run: a publisher that cannot be
reached is a ``failed`` publication, an error in this module is an ``error`` event.
"""
from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import pydicom
from sqlalchemy import and_, func, insert, select
from sqlalchemy.engine import Engine

from pacs_bridge.publishers import (
    CREATED,
    FAILED,
    NOTIFIED,
    RAISED,
    REVERTED,
    UNCHANGED,
    Hl7OrderPublisher,
    PriorityRaiser,
    PriorityUpdate,
    Publication,
    Publisher,
    build_publishers,
)
from pacs_bridge.results import Finding, TriageResult
from sql.schema import events, instances, predictions, processing_runs, series, studies, utcnow
from worker.config import Settings
from worker.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)

EVENT_KIND = "publication"


def configured_publishers(settings: Settings) -> list[Publisher]:
    return build_publishers(settings.publishers, settings.publishing.model_dump())


@dataclass(frozen=True)
class StudyInfo:
    study_instance_uid: str
    accession_number: str | None
    study_description: str | None
    first_instance_path: str | None


def study_info(engine: Engine, run_id: int) -> StudyInfo:
    with engine.connect() as connection:
        row = connection.execute(
            select(studies.c.id, studies.c.study_instance_uid, studies.c.accession_number,
                   studies.c.study_description)
            .select_from(processing_runs.join(studies, studies.c.id == processing_runs.c.study_id))
            .where(processing_runs.c.id == run_id)
        ).first()
        if row is None:
            raise ValueError(f"processing run {run_id} does not exist")
        path = connection.execute(
            select(instances.c.path).select_from(series.join(instances, instances.c.series_id == series.c.id))
            .where(series.c.study_id == row.id).order_by(instances.c.id).limit(1)
        ).scalar()
    return StudyInfo(row.study_instance_uid, row.accession_number, row.study_description, path)


def ai_reason(result: TriageResult, top: int = 3) -> str:
    """One line saying why the AI chose the priority: the leading findings and the referrals."""
    findings = ", ".join(f"{f.label} {f.probability:.2f}" for f in result.findings[:top]) or "no finding"
    referrals = f"; referral: {', '.join(result.referrals)}" if result.referrals else ""
    return f"AI priority {result.priority} ({findings}{referrals})"


def patient_id(info: StudyInfo) -> str | None:
    """The PatientID of the study's first image, which HL7 order messages need (PID-3). Never stored or
    logged."""
    if not info.first_instance_path:
        return None
    try:
        header = pydicom.dcmread(info.first_instance_path, stop_before_pixels=True,
                                 specific_tags=["PatientID"])
    except (OSError, pydicom.errors.InvalidDicomError):
        log.warning("study %s: could not read PatientID from its first instance", info.study_instance_uid)
        return None
    return str(header.get("PatientID", "")) or None


def priority_update(settings: Settings, info: StudyInfo, result: TriageResult, run_id: int | None,
                    with_patient_id: bool = False) -> PriorityUpdate:
    base = settings.publishing.worklist_url.rstrip("/")
    return PriorityUpdate(
        study_instance_uid=info.study_instance_uid, priority=result.priority, reason=ai_reason(result),
        accession_number=info.accession_number, study_description=info.study_description,
        findings=tuple((f.label, f.probability) for f in result.findings), referrals=tuple(result.referrals),
        model_name=result.model_name, model_version=result.model_version, run_id=run_id,
        worklist_url=f"{base}/study?uid={info.study_instance_uid}" if base else None,
        patient_id=patient_id(info) if with_patient_id else None,
    )


def last_known_values(engine: Engine, study_uid: str) -> dict[str, str]:
    """Per publisher, the value it last set or found for the study: the current value for systems that cannot
    be asked (HL7 v2), and what a webhook last notified."""
    known: dict[str, str] = {}
    with engine.connect() as connection:
        rows = connection.execute(
            select(events.c.detail)
            .where(and_(events.c.kind == EVENT_KIND, events.c.study_instance_uid == study_uid))
            .order_by(events.c.id)).all()
    for (detail,) in rows:
        if not detail:
            continue
        if detail.get("action") in (RAISED, CREATED, REVERTED, NOTIFIED) and detail.get("new"):
            known[detail["publisher"]] = detail["new"]
        elif detail.get("action") == UNCHANGED and detail.get("original"):
            known[detail["publisher"]] = detail["original"]
    return known


def record(engine: Engine, update: PriorityUpdate, publications: list[Publication],
           **extra: Any) -> list[int]:
    """Write each publication as an ``events`` row; returns their ids."""
    ids = []
    with engine.begin() as connection:
        for p in publications:
            detail = {**p.as_detail(), "run_id": update.run_id, "ai_reason": update.reason,
                      "model": f"{update.model_name} {update.model_version}".strip(), **extra}
            ids.append(connection.execute(insert(events).values(
                at=utcnow(), kind=EVENT_KIND, study_instance_uid=update.study_instance_uid,
                reason=f"{p.publisher} ({p.kind}) {p.target}: {p.action}: {p.reason}"[:4000], detail=detail,
            )).inserted_primary_key[0])
    return ids


def publish_run(settings: Settings, engine: Engine, run_id: int,
                only: Collection[str] | None = None) -> list[Publication]:
    """Publish a finished run's priority, rebuilt from the database, with every configured publisher (or those
    named in ``only``); returns what each did. Never raises."""
    try:
        result = stored_result(engine, run_id)
    except Exception as exc:
        log.exception("run %d: nothing to publish", run_id)
        _record_error(engine, run_id, None, exc)
        return []
    return publish_result(settings, engine, run_id, result, only=only)


def dead_letter_publications(engine: Engine, run_id: int, publishers: list[str], attempts: int) -> None:
    """Record that the run's publications to ``publishers`` were given up after ``attempts`` tries."""
    info = study_info(engine, run_id)
    with engine.begin() as connection:
        for name in publishers:
            DEAD_LETTERS.inc()
            connection.execute(insert(events).values(
                at=utcnow(), kind="dead_letter", study_instance_uid=info.study_instance_uid,
                reason=f"publication of run {run_id} to {name} failed {attempts} times; "
                       "`triage publications retry` publishes it again",
                detail={"publication": True, "run_id": run_id, "publisher": name, "attempts": attempts}))
    log.warning("run %d study %s: publications to %s dead-lettered after %d attempts", run_id,
                info.study_instance_uid, ", ".join(publishers), attempts)


def dead_publications(engine: Engine) -> list:
    """Dead-lettered publications whose publisher has not succeeded for the study since (newest first)."""
    with engine.connect() as connection:
        dead = connection.execute(select(events).where(events.c.kind == "dead_letter")
                                  .order_by(events.c.id.desc())).all()
        later = connection.execute(select(events.c.id, events.c.study_instance_uid, events.c.detail)
                                   .where(events.c.kind == EVENT_KIND)).all()
    done_after: dict[tuple[str, str], int] = {}
    for event_id, study_uid, detail in later:
        if detail and detail.get("action") not in (FAILED, None):
            key = (study_uid, detail.get("publisher"))
            done_after[key] = max(done_after.get(key, 0), event_id)
    return [row for row in dead if (row.detail or {}).get("publication")
            and done_after.get((row.study_instance_uid, row.detail.get("publisher")), 0) < row.id]


def _record_error(engine: Engine, run_id: int, study_uid: str | None, exc: Exception) -> None:
    try:
        with engine.begin() as connection:
            connection.execute(insert(events).values(
                at=utcnow(), kind="error", study_instance_uid=study_uid,
                reason=f"publishing run {run_id} failed: {type(exc).__name__}: {exc}"[:4000],
                detail={"run_id": run_id, "stage": "publishing"}))
    except Exception:
        log.exception("could not record the publishing failure of run %d", run_id)


def publish_result(settings: Settings, engine: Engine, run_id: int, result: TriageResult,
                   only: Collection[str] | None = None) -> list[Publication]:
    """Publish ``result``'s priority with every configured publisher (or those named in ``only``) and record
    what each did. Never raises."""
    try:
        publishers = [p for p in configured_publishers(settings) if only is None or p.name in only]
        if not publishers:
            return []
        info = study_info(engine, run_id)
        update = priority_update(settings, info, result, run_id,
                                 with_patient_id=any(isinstance(p, Hl7OrderPublisher) for p in publishers))
        known = last_known_values(engine, info.study_instance_uid)
        done: list[Publication] = []
        for publisher in publishers:
            try:
                publications = publisher.publish(update, known.get(publisher.name))
            except Exception as exc:  # a bug in one adapter must not stop the others, nor the run
                log.exception("publisher %s failed on study %s", publisher.name, info.study_instance_uid)
                publications = [Publication(publisher.name, publisher.kind, info.accession_number
                                            or info.study_instance_uid, "failed", result.priority,
                                            f"{type(exc).__name__}: {exc}")]
            for p in publications:
                log.info("run %d study %s: %s %s %s (%s -> %s)", run_id, info.study_instance_uid, p.publisher,
                         p.action, p.target, p.original, p.new)
            record(engine, update, publications)
            done.extend(publications)
        return done
    except Exception as exc:
        log.exception("publishing run %d failed", run_id)
        _record_error(engine, run_id, result.study_instance_uid, exc)
        return []


def revert(settings: Settings, engine: Engine, event_id: int) -> Publication:
    """Put back the value a recorded ``raised`` publication replaced, if the target still holds ours."""
    with engine.connect() as connection:
        row = connection.execute(select(events).where(events.c.id == event_id)).first()
    if row is None or row.kind != EVENT_KIND:
        raise ValueError(f"event {event_id} is not a publication (see `triage publications`)")
    detail = row.detail or {}
    if detail.get("action") != RAISED:
        raise ValueError(f"publication {event_id} was {detail.get('action')!r}, not 'raised': "
                         "nothing to revert")
    publisher = {p.name: p for p in configured_publishers(settings)}.get(detail["publisher"])
    if publisher is None:
        raise ValueError(f"publisher {detail['publisher']!r} is no longer configured")
    if not isinstance(publisher, PriorityRaiser):
        raise ValueError(f"publisher {publisher.name!r} ({publisher.kind}) changes nothing that could be "
                         "reverted")
    run_id = detail.get("run_id")
    info = study_info(engine, run_id) if run_id is not None \
        else StudyInfo(row.study_instance_uid, None, None, None)
    update = PriorityUpdate(
        study_instance_uid=info.study_instance_uid, priority=detail.get("ai_priority", "routine"),
        reason=f"revert of publication {event_id}", accession_number=info.accession_number,
        study_description=info.study_description, run_id=run_id,
        patient_id=patient_id(info) if isinstance(publisher, Hl7OrderPublisher) else None,
    )
    publication = publisher.revert(detail["target"], detail.get("original"), detail.get("new"), update)
    record(engine, update, [publication], reverts=event_id)
    return publication


def stored_result(engine: Engine, run_id: int) -> TriageResult:
    """A finished run's result as the pipeline published it, rebuilt from the run and its predictions."""
    with engine.connect() as connection:
        run = connection.execute(
            select(processing_runs.c.priority, processing_runs.c.model_name, processing_runs.c.model_version,
                   studies.c.study_instance_uid)
            .select_from(processing_runs.join(studies, studies.c.id == processing_runs.c.study_id))
            .where(processing_runs.c.id == run_id)).first()
        rows = connection.execute(select(predictions).where(and_(
            predictions.c.run_id == run_id, predictions.c.reported == 1))).all()
    if run is None or not run.priority:
        raise ValueError(f"run {run_id} has no result to publish")
    diagnoses = sorted((r for r in rows if r.kind == "diagnosis"), key=lambda r: r.probability, reverse=True)
    findings = tuple(Finding(r.label, r.probability, r.threshold if r.threshold is not None else 0.0)
                     for r in diagnoses)
    return TriageResult(study_instance_uid=run.study_instance_uid, priority=run.priority, findings=findings,
                        referrals=tuple(sorted(r.label for r in rows if r.kind == "referral")),
                        model_name=run.model_name or "", model_version=run.model_version or "")


def retry_failed(settings: Settings, engine: Engine, event_ids: list[int] | None = None) -> list[Publication]:
    """Publish again where a publisher's latest attempt for a study failed (the RIS was down, say), from the
    run that failed. A study processed again since then was published by its newer run and is left alone."""
    with engine.connect() as connection:
        rows = connection.execute(select(events.c.id, events.c.study_instance_uid, events.c.detail)
                                  .where(events.c.kind == EVENT_KIND).order_by(events.c.id)).all()
        latest_run = dict(connection.execute(
            select(studies.c.study_instance_uid, func.max(processing_runs.c.id))
            .select_from(processing_runs.join(studies, studies.c.id == processing_runs.c.study_id))
            .group_by(studies.c.study_instance_uid)).all())
    latest: dict[tuple[str, str], tuple[int, dict]] = {}
    for event_id, study_uid, detail in rows:
        if detail and detail.get("publisher") and not detail.get("reverts"):
            latest[(study_uid, detail["publisher"])] = (event_id, detail)
    publishers = {p.name: p for p in configured_publishers(settings)}
    done: list[Publication] = []
    for (study_uid, name), (event_id, detail) in sorted(latest.items(), key=lambda kv: kv[1][0]):
        if detail.get("action") != FAILED or (event_ids and event_id not in event_ids):
            continue
        run_id = detail.get("run_id")
        publisher = publishers.get(name)
        if publisher is None or run_id is None or latest_run.get(study_uid) != run_id:
            continue
        info = study_info(engine, run_id)
        update = priority_update(settings, info, stored_result(engine, run_id), run_id,
                                 with_patient_id=isinstance(publisher, Hl7OrderPublisher))
        publications = publisher.publish(update, last_known_values(engine, study_uid).get(name))
        record(engine, update, publications, retry_of=event_id)
        done.extend(publications)
    return done


def publications(engine: Engine, study_uid: str | None = None, limit: int = 50) -> list:
    query = select(events).where(events.c.kind == EVENT_KIND)
    if study_uid:
        query = query.where(events.c.study_instance_uid == study_uid)
    with engine.connect() as connection:
        return connection.execute(query.order_by(events.c.id.desc()).limit(limit)).all()
