"""Storing a radiologist's report: the report row, the study's attributes, and the labels read from its text.

Both intake paths (HL7 ORU over MLLP in ``pacs_bridge.hl7_intake``, the HTTP endpoint in ``worker.api.reports``)
build a :class:`FinalReport` and call :func:`store_report`. The labeller is handed in by the caller (the worker
composes it from ``models.labeller``), so this package needs no model code.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from pacs_bridge.study_attributes import StudyAttributes, save_attributes
from sql.report_schema import ground_truth_labels, reports
from sql.schema import studies, utcnow

#: HL7 table 0123 result statuses we store; F (final) and C (corrected) are final reports.
RESULT_STATUSES = frozenset("FCPARSI")
FINAL_STATUSES = frozenset("FC")
MAX_REPORT_CHARS = 200_000


class ReportValidationError(ValueError):
    """A report that cannot be stored as it is; the message names the field and what is wrong with it."""


class Mention(Protocol):
    label: str
    value: int
    evidence: str | None


class Labeller(Protocol):
    """What the intake needs from a report labeller (``models.labeller.ReportLabeller`` satisfies it)."""

    name: str

    def label(self, text: str) -> Sequence[Mention]: ...


@dataclass(frozen=True)
class FinalReport:
    text: str
    reported_at: datetime
    source: str
    status: str = "F"
    accession_number: str | None = None
    study_instance_uid: str | None = None
    exam_at: datetime | None = None
    source_message_id: str | None = None
    attributes: StudyAttributes | None = None

    def __post_init__(self) -> None:
        if not self.text or not self.text.strip():
            raise ReportValidationError("the report text is empty")
        if len(self.text) > MAX_REPORT_CHARS:
            raise ReportValidationError(f"the report text has {len(self.text)} characters, over {MAX_REPORT_CHARS}")
        if not (self.accession_number or self.study_instance_uid):
            raise ReportValidationError("the report names neither an accession number nor a study instance UID")
        if self.status not in RESULT_STATUSES:
            raise ReportValidationError(f"result status {self.status!r} is not one of {''.join(sorted(RESULT_STATUSES))}")
        for name in ("reported_at", "exam_at"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ReportValidationError(f"{name} {value.isoformat()} has no time zone")
        if self.exam_at is not None and self.exam_at > self.reported_at:
            raise ReportValidationError(
                f"the report time {self.reported_at.isoformat()} is before the examination {self.exam_at.isoformat()}")


@dataclass(frozen=True)
class StoredReport:
    report_id: int
    study_instance_uid: str | None
    labels: tuple[tuple[str, int], ...]
    duplicate: bool = False


def store_report(connection: Connection, report: FinalReport, labeller: Labeller | None = None) -> StoredReport:
    """Store ``report`` (once per source message), its study's attributes, and its labels as ground truth."""
    if report.source_message_id:
        existing = connection.execute(
            select(reports.c.id, reports.c.study_instance_uid)
            .where(reports.c.source == report.source, reports.c.source_message_id == report.source_message_id)
        ).first()
        if existing is not None:
            labels = connection.execute(select(ground_truth_labels.c.label, ground_truth_labels.c.value)
                                        .where(ground_truth_labels.c.report_id == existing.id)).all()
            return StoredReport(existing.id, existing.study_instance_uid, tuple(map(tuple, labels)), duplicate=True)

    study_uid = report.study_instance_uid or _study_uid_for_accession(connection, report.accession_number)
    report_id = int(connection.execute(insert(reports).values(
        study_instance_uid=study_uid, accession_number=report.accession_number, status=report.status,
        exam_at=report.exam_at, reported_at=report.reported_at, received_at=utcnow(), text=report.text,
        source=report.source, source_message_id=report.source_message_id,
    )).inserted_primary_key[0])

    attrs = report.attributes or StudyAttributes()
    attrs.study_instance_uid = study_uid
    attrs.accession_number = report.accession_number
    attrs.exam_at = attrs.exam_at or report.exam_at
    save_attributes(connection, attrs)

    labels: list[tuple[str, int]] = []
    if labeller is not None:
        now = utcnow()
        rows = []
        for mention in labeller.label(report.text):
            rows.append({"report_id": report_id, "label": mention.label, "value": int(mention.value),
                         "source": labeller.name, "evidence": (mention.evidence or "")[:1000], "created_at": now})
            labels.append((mention.label, int(mention.value)))
        if rows:
            connection.execute(insert(ground_truth_labels), rows)
    return StoredReport(report_id, study_uid, tuple(labels))


def _study_uid_for_accession(connection: Connection, accession: str | None) -> str | None:
    if not accession:
        return None
    uids = connection.execute(select(studies.c.study_instance_uid)
                              .where(studies.c.accession_number == accession).limit(2)).scalars().all()
    # Two studies under one accession number: the report cannot be assigned to either with confidence.
    return uids[0] if len(uids) == 1 else None
