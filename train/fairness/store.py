"""The fairness refresh (the beat's ``fairness-refresh`` entry, or ``triage fairness refresh``): link reports to
studies, fill attributes from DICOM, analyse, store the results.

Each refresh is one row of ``fairness_refreshes`` (running -> done | failed) with its result rows in
``fairness_turnaround_odds``, ``fairness_rate_disparities`` and ``fairness_turnaround_summary``; the views
``v_fairness_latest_*`` show the latest completed one. Old refreshes are kept (``keep`` most recent) so that a
trend can be drawn.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.engine import Connection, Engine

from pacs_bridge.study_attributes import (
    AttributePolicy,
    StudyAttributes,
    attributes_from_dicom,
    save_attributes,
)
from sql.fairness_schema import (
    fairness_rate_disparities,
    fairness_refreshes,
    fairness_turnaround_odds,
    fairness_turnaround_summary,
)
from sql.report_schema import reports, study_attributes
from sql.schema import instances, series, studies, utcnow
from train.fairness.analysis import (
    FairnessConfig,
    FairnessResults,
    RateDisparity,
    TurnaroundOdds,
    TurnaroundSummary,
    analyse,
)
from train.fairness.cohort import load_cohort_db

log = logging.getLogger(__name__)


def link_reports_to_studies(connection: Connection) -> int:
    """Give reports and attribute rows known only by accession number their study's UID, once it has arrived."""
    linked = 0
    for table in (reports, study_attributes):
        candidates = connection.execute(
            select(table.c.id, table.c.accession_number)
            .where(table.c.study_instance_uid.is_(None), table.c.accession_number.is_not(None))).all()
        for row_id, accession in candidates:
            uids = connection.execute(select(studies.c.study_instance_uid)
                                      .where(studies.c.accession_number == accession).limit(2)).scalars().all()
            if len(uids) != 1:
                continue
            if table is study_attributes and connection.execute(
                    select(table.c.id).where(table.c.study_instance_uid == uids[0])).first() is not None:
                continue  # the study already has a row from its images; the refresh below merges nothing twice
            connection.execute(update(table).where(table.c.id == row_id).values(study_instance_uid=uids[0]))
            linked += 1
    return linked


def fill_attributes_from_dicom(connection: Connection, policy: AttributePolicy, limit: int = 500) -> int:
    """Read one stored instance header of each study whose DICOM header has not been read yet, and merge it in.

    A study whose attributes came from HL7 first still gets its scanner (and anything else HL7 lacked) this way.
    ``sources["dicom_header"]`` records that the header was read (read | unreadable | no instance), so each study
    is read once.
    """
    done = 0
    missing = connection.execute(text(
        "SELECT s.id, s.study_instance_uid FROM studies s LEFT JOIN study_attributes a "
        "ON a.study_instance_uid = s.study_instance_uid "
        "WHERE a.id IS NULL OR a.sources IS NULL OR CAST(a.sources AS TEXT) NOT LIKE '%dicom_header%' "
        "ORDER BY s.id LIMIT :limit"), {"limit": limit}).all()
    for study_id, uid in missing:
        path = connection.execute(
            select(instances.c.path).join(series, series.c.id == instances.c.series_id)
            .where(series.c.study_id == study_id).order_by(instances.c.id).limit(1)).scalar()
        attrs, outcome = StudyAttributes(), "no instance"
        if path and Path(path).exists():
            try:
                attrs, outcome = attributes_from_dicom(pydicom.dcmread(path, stop_before_pixels=True), policy), "read"
            except Exception as exc:  # noqa: BLE001 - a bad header costs the study its attributes, not the refresh
                log.warning("fairness: cannot read attributes of study %s from %s: %s", uid, path, exc)
                outcome = "unreadable"
        attrs.study_instance_uid = uid
        attrs.sources["dicom_header"] = outcome
        save_attributes(connection, attrs)
        done += 1
    return done


def store_results(connection: Connection, results: FairnessResults, refresh_id: int) -> None:
    for table, rows, kind in ((fairness_turnaround_odds, results.odds, TurnaroundOdds),
                              (fairness_rate_disparities, results.disparities, RateDisparity),
                              (fairness_turnaround_summary, results.summaries, TurnaroundSummary)):
        if rows:
            connection.execute(insert(table), [{"refresh_id": refresh_id, **asdict(row)} for row in rows])


def refresh(engine: Engine, config: FairnessConfig, policy: AttributePolicy | None = None,
            keep: int = 50, as_of: datetime | None = None) -> FairnessResults:
    """One refresh; raises after recording the failure if the analysis fails."""
    started = utcnow()
    with engine.begin() as connection:
        refresh_id = connection.execute(insert(fairness_refreshes).values(
            started_at=started, status="running", source="database",
            parameters=config.parameters())).inserted_primary_key[0]
    try:
        with engine.begin() as connection:
            linked = link_reports_to_studies(connection)
            filled = fill_attributes_from_dicom(connection, policy) if policy is not None else 0
            cohort = load_cohort_db(connection, as_of)
        results = analyse(cohort, config)
        with engine.begin() as connection:
            store_results(connection, results, refresh_id)
            connection.execute(update(fairness_refreshes).where(fairness_refreshes.c.id == refresh_id).values(
                status="done", finished_at=utcnow(), n_studies=results.n_studies, n_reported=results.n_reported,
                parameters=results.parameters))
            stale = connection.execute(select(fairness_refreshes.c.id).order_by(fairness_refreshes.c.id.desc())
                                       .offset(keep)).scalars().all()
            if stale:
                for table in (fairness_turnaround_odds, fairness_rate_disparities, fairness_turnaround_summary):
                    connection.execute(delete(table).where(table.c.refresh_id.in_(stale)))
                connection.execute(delete(fairness_refreshes).where(fairness_refreshes.c.id.in_(stale)))
    except Exception as exc:
        with engine.begin() as connection:
            connection.execute(update(fairness_refreshes).where(fairness_refreshes.c.id == refresh_id).values(
                status="failed", finished_at=utcnow(), error=f"{type(exc).__name__}: {exc}"[:2000]))
        raise
    results.refresh_id = refresh_id
    log.info("fairness refresh %s: %d studies (%d reported), %d reports linked, %d attribute rows from DICOM, "
             "%.1f s", refresh_id, results.n_studies, results.n_reported, linked, filled,
             (utcnow() - started).total_seconds())
    return results


def load_latest(connection: Connection) -> FairnessResults | None:
    """The latest completed refresh's results, or None if there has been none."""
    latest = connection.execute(select(fairness_refreshes).where(fairness_refreshes.c.status == "done")
                                .order_by(fairness_refreshes.c.id.desc()).limit(1)).first()
    if latest is None:
        return None

    def rows(table, kind):
        names = [f.name for f in fields(kind)]
        return [kind(**{name: row._mapping[name] for name in names})
                for row in connection.execute(select(table).where(table.c.refresh_id == latest.id)
                                              .order_by(table.c.id))]

    finished = latest.finished_at
    return FairnessResults(
        source=latest.source, n_studies=latest.n_studies or 0, n_reported=latest.n_reported or 0,
        parameters=latest.parameters or {}, odds=rows(fairness_turnaround_odds, TurnaroundOdds),
        disparities=rows(fairness_rate_disparities, RateDisparity),
        summaries=rows(fairness_turnaround_summary, TurnaroundSummary), refresh_id=latest.id,
        finished_at=finished.astimezone(UTC).isoformat(timespec="seconds") if finished else None)
