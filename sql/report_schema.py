"""Tables for final reports, ground truth and sensitive attributes (SQLAlchemy Core).

They share ``sql.base.metadata`` (``sql.schema`` imports this module, so anything that uses ``sql.schema.metadata``
sees them); migration ``0002`` creates them, with the fairness tables (``sql.fairness_schema``) and the reporting
views in ``sql/views``.

Like the rest of the bookkeeping database, nothing here holds a patient's name, identifier, date of birth or
address: the attributes needed for fairness analysis are stored already reduced to their groups (an age band,
not a birth date; a region and density quartile, not a postcode). A missing value is the group ``unknown``.
"""
from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, ForeignKey, Integer, String, Table, Text, UniqueConstraint

from sql.base import UID, metadata

#: The group of a study whose attribute is not known; analysed as a group of its own, never dropped.
UNKNOWN = "unknown"

#: The sensitive attributes kept per study, in the order reports list them.
ATTRIBUTES: tuple[str, ...] = (
    "sex",
    "age_band",
    "ethnic_group",
    "region",
    "density_quartile",
    "scheduling",
    "scanner_manufacturer",
    "scanner_model",
    "insurance_class",
)

study_attributes = Table(
    "study_attributes",
    metadata,
    Column("id", Integer, primary_key=True),
    # Not a foreign key: a report (and the patient's attributes from HL7) can arrive before the images. Rows
    # known only by accession number are linked to their study when it arrives (see the fairness refresh).
    Column("study_instance_uid", UID, unique=True),
    Column("accession_number", String(64), index=True),
    # The time of the examination (DICOM StudyDate/StudyTime or HL7 OBR-7), start of the radiologist turnaround.
    Column("exam_at", DateTime(timezone=True)),
    *(Column(name, String(64), nullable=False, default=UNKNOWN) for name in ATTRIBUTES),
    # Where each attribute came from, e.g. {"sex": "dicom", "region": "hl7"}.
    Column("sources", JSON),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

reports = Table(
    "reports",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_instance_uid", UID, index=True),
    Column("accession_number", String(64), index=True),
    # HL7 OBR-25 result status: F final, C corrected, P preliminary, ...; only F and C count as final reports.
    Column("status", String(2), nullable=False),
    Column("exam_at", DateTime(timezone=True)),
    # When the radiologist signed the report (HL7 OBR-22, else MSH-7): the end of the radiologist turnaround.
    Column("reported_at", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("text", Text, nullable=False),
    # hl7 | http | synthetic
    Column("source", String(16), nullable=False),
    # The sender's message control ID (MSH-10) or the HTTP client's identifier: a resent message is not stored twice.
    Column("source_message_id", String(64)),
    UniqueConstraint("source", "source_message_id", name="uq_report_source_message"),
)

ground_truth_labels = Table(
    "ground_truth_labels",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("report_id", Integer, ForeignKey("reports.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("label", String(96), nullable=False),
    # 1 present, 0 explicitly absent (negated), -1 uncertain. A diagnosis without a row was not mentioned.
    Column("value", Integer, nullable=False),
    # Who labelled it: "keyword-labeller/1", "manual:<reader>", "synthetic", ...
    Column("source", String(64), nullable=False),
    # The sentence the label came from, so that a reviewer can check it.
    Column("evidence", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("report_id", "label", "source", name="uq_ground_truth_label"),
)

hl7_messages = Table(
    "hl7_messages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False, index=True),
    Column("peer", String(64)),
    Column("control_id", String(64)),
    Column("message_type", String(16)),
    # accepted | rejected | error
    Column("status", String(16), nullable=False),
    # The acknowledgement code sent back: AA, AR or AE.
    Column("ack_code", String(2), nullable=False),
    Column("reason", Text),
    # A rejected message's raw bytes, kept on disk (they may hold identifiers, so not in this database).
    Column("path", Text),
    Column("sha256", String(64)),
    Column("size_bytes", Integer),
    Column("report_id", Integer, ForeignKey("reports.id", ondelete="SET NULL")),
)
