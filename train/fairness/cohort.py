"""The studies a fairness analysis looks at, as arrays: attributes, turnarounds, model calls and ground truth.

Two sources give the same :class:`Cohort`: the bookkeeping database (the ``v_study_turnaround`` and
``v_diagnosis_outcomes`` views) and a CSV file in the layout of ``train/data/synthetic_cohort.csv``:

``study_instance_uid, accession_number, <the attributes>, exam_at, last_image_at, queued_at, started_at,
delivered_at, reported_at, truth, p_<diagnosis>..., threshold``

where ``truth`` lists the diagnoses the final report confirms (``;``-separated; a trailing ``?`` marks an
uncertain one) and ``reported_at`` is empty for a study without a final report. Rows are ordered by study UID in
both cases, so the seeded bootstrap gives the same numbers whichever source the data came from.
"""
from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import insert, text
from sqlalchemy.engine import Connection, Engine

from models.labels import DIAGNOSIS_NAMES
from sql.report_schema import ATTRIBUTES, UNKNOWN, ground_truth_labels, reports, study_attributes
from sql.schema import predictions, processing_runs, studies

TIMESTAMPS = ("exam_at", "last_image_at", "queued_at", "started_at", "delivered_at", "reported_at")
MEASURES = ("ai", "queue", "radiologist")
MEASURE_NAMES = {"ai": "AI turnaround (last image to SR acknowledged)", "queue": "queue wait (queued to started)",
                 "radiologist": "radiologist turnaround (examination to final report)"}
NOT_EVALUATED = -2


@dataclass
class Cohort:
    """Per study (rows) and per diagnosis (columns). Missing durations are NaN."""

    study_uids: np.ndarray
    attributes: dict[str, np.ndarray]
    durations: dict[str, np.ndarray]
    exam_at: np.ndarray  # seconds since the epoch, NaN if unknown
    reported: np.ndarray  # bool: has a final report
    diagnoses: tuple[str, ...]
    truth: np.ndarray  # int8 (n, d): 1 present, 0 absent, -1 uncertain, -2 not evaluated (no report/prediction)
    predicted: np.ndarray  # bool (n, d)
    as_of: float  # when the data were taken (seconds since the epoch): unreported studies are censored here
    source: str = "database"
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.study_uids)

    def groups(self, attribute: str) -> np.ndarray:
        """Group labels of every study for an attribute, or for "a&b" the intersection of attributes a and b."""
        names = attribute.split("&")
        for name in names:
            if name not in self.attributes:
                raise KeyError(f"unknown attribute {name!r}; known: {sorted(self.attributes)}")
        if len(names) == 1:
            return self.attributes[names[0]]
        return np.array(["&".join(values) for values in zip(*(self.attributes[n] for n in names))], dtype=object)


def _seconds(value: datetime | str | None) -> float:
    if value is None or value == "":
        return float("nan")
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _ordered_diagnoses(names: Iterable[str]) -> tuple[str, ...]:
    index = {name: i for i, name in enumerate(DIAGNOSIS_NAMES)}
    return tuple(sorted(set(names), key=lambda n: (index.get(n, len(index)), n)))


def _assemble(records: list[dict], diagnoses: Sequence[str], outcomes: dict[str, dict[str, tuple[int, int]]],
              as_of: float | None, source: str) -> Cohort:
    records.sort(key=lambda r: r["study_instance_uid"])
    n, d = len(records), len(diagnoses)
    column = {name: i for i, name in enumerate(diagnoses)}
    truth = np.full((n, d), NOT_EVALUATED, dtype=np.int8)
    predicted = np.zeros((n, d), dtype=bool)
    for row, record in enumerate(records):
        for diagnosis, (called, value) in outcomes.get(record["study_instance_uid"], {}).items():
            predicted[row, column[diagnosis]] = bool(called)
            if record["reported"]:
                truth[row, column[diagnosis]] = value
    stamps = {name: np.array([_seconds(r.get(name)) for r in records], dtype=float) for name in TIMESTAMPS}
    durations = {
        "ai": stamps["delivered_at"] - stamps["last_image_at"],
        "queue": stamps["started_at"] - stamps["queued_at"],
        "radiologist": stamps["reported_at"] - stamps["exam_at"],
    }
    for name in MEASURES:  # a negative duration is a clock or data error, not a fast study
        durations[name][durations[name] < 0] = np.nan
    if as_of is None:
        known = np.concatenate([s[~np.isnan(s)] for s in stamps.values()]) if n else np.array([])
        as_of = float(known.max()) if known.size else datetime.now(UTC).timestamp()
    return Cohort(
        study_uids=np.array([r["study_instance_uid"] for r in records], dtype=object),
        attributes={name: np.array([r.get(name) or UNKNOWN for r in records], dtype=object) for name in ATTRIBUTES},
        durations=durations, exam_at=stamps["exam_at"],
        reported=np.array([bool(r["reported"]) for r in records], dtype=bool),
        diagnoses=tuple(diagnoses), truth=truth, predicted=predicted, as_of=as_of, source=source,
    )


def load_cohort_csv(path: str | Path, as_of: float | None = None) -> Cohort:
    """A cohort from a CSV file (see the module docstring); ``as_of`` defaults to its latest timestamp."""
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        missing = {"study_instance_uid", "truth", "threshold", *ATTRIBUTES, *TIMESTAMPS} - set(fields)
        if missing:
            raise ValueError(f"cohort {path}: missing columns {sorted(missing)}")
        diagnoses = _ordered_diagnoses(name[2:] for name in fields if name.startswith("p_"))
        unknown = set(diagnoses) - set(DIAGNOSIS_NAMES)
        if unknown:
            raise ValueError(f"cohort {path}: columns for unknown diagnoses {sorted(unknown)}")
        records, outcomes = [], {}
        for line, row in enumerate(reader, start=2):
            row = dict(row)
            row["reported"] = bool(row["reported_at"])
            threshold = float(row["threshold"] or 0.5)
            present, uncertain = set(), set()
            for item in filter(None, (t.strip() for t in row["truth"].split(";"))):
                (uncertain if item.endswith("?") else present).add(item.rstrip("?"))
            if (present | uncertain) - set(diagnoses):
                raise ValueError(f"cohort {path} line {line}: truth names diagnoses without a p_ column: "
                                 f"{sorted((present | uncertain) - set(diagnoses))}")
            outcomes[row["study_instance_uid"]] = {
                name: (float(row[f"p_{name}"]) >= threshold, 1 if name in present else -1 if name in uncertain else 0)
                for name in diagnoses if row.get(f"p_{name}", "") != ""}
            records.append(row)
    return _assemble(records, diagnoses, outcomes, as_of, f"cohort:{Path(path).name}")


def load_cohort_db(connection: Connection, as_of: datetime | None = None) -> Cohort:
    """A cohort from the bookkeeping database, through the reporting views."""
    records = []
    for row in connection.execute(text(
            "SELECT study_instance_uid, label_report_id, exam_at, last_image_at, queued_at, started_at, "
            f"delivered_at, reported_at, {', '.join(ATTRIBUTES)} FROM v_study_turnaround")).mappings():
        record = dict(row)
        record["reported"] = row["label_report_id"] is not None
        records.append(record)
    outcomes: dict[str, dict[str, tuple[int, int]]] = {}
    for uid, diagnosis, called, value in connection.execute(text(
            "SELECT study_instance_uid, diagnosis, predicted, truth FROM v_diagnosis_outcomes")):
        outcomes.setdefault(uid, {})[diagnosis] = (int(called), int(value))
    # Model calls for studies without a final report are not in the outcomes view; they are not evaluated anyway.
    diagnoses = _ordered_diagnoses(name for per_study in outcomes.values() for name in per_study)
    moment = (as_of or datetime.now(UTC)).timestamp()
    return _assemble(records, diagnoses, outcomes, moment, "database")


def write_cohort_db(engine: Engine, path: str | Path) -> int:
    """Load a cohort CSV into the bookkeeping tables (studies, runs, predictions, attributes, reports, labels).

    For demonstrations and tests: the synthetic cohort then flows through the same views and refresh as real
    data. Returns the number of studies written.
    """
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    diagnoses = [name[2:] for name in (rows[0].keys() if rows else ()) if name.startswith("p_")]
    with engine.begin() as connection:
        first_id = connection.execute(text("SELECT COALESCE(MAX(id), 0) FROM studies")).scalar_one() + 1
        first_run = connection.execute(text("SELECT COALESCE(MAX(id), 0) FROM processing_runs")).scalar_one() + 1
        first_report = connection.execute(text("SELECT COALESCE(MAX(id), 0) FROM reports")).scalar_one() + 1
        study_rows, run_rows, prediction_rows, attribute_rows, report_rows, label_rows = [], [], [], [], [], []
        report_id = first_report
        for offset, row in enumerate(rows):
            study_id, run_id = first_id + offset, first_run + offset
            stamp = {name: datetime.fromisoformat(row[name]) if row[name] else None for name in TIMESTAMPS}
            study_rows.append({
                "id": study_id, "study_instance_uid": row["study_instance_uid"],
                "accession_number": row.get("accession_number") or None, "status": "done", "version": 1,
                "pipeline": "neuro_mri", "instance_count": 1, "modalities": "MR",
                "first_received_at": stamp["last_image_at"] or stamp["exam_at"],
                "last_received_at": stamp["last_image_at"] or stamp["exam_at"], "dispatched_at": stamp["queued_at"],
            })
            run_rows.append({
                "id": run_id, "study_id": study_id, "study_version": 1, "pipeline": "neuro_mri", "status": "done",
                "attempts": 1, "last_image_at": stamp["last_image_at"], "queued_at": stamp["queued_at"],
                "started_at": stamp["started_at"], "delivered_at": stamp["delivered_at"],
                "finished_at": stamp["delivered_at"], "model_name": "synthetic",
            })
            threshold = float(row["threshold"] or 0.5)
            prediction_rows.extend({"run_id": run_id, "kind": "diagnosis", "label": name,
                                    "probability": float(row[f"p_{name}"]), "threshold": threshold, "reported": 0}
                                   for name in diagnoses if row[f"p_{name}"] != "")
            attribute_rows.append({"study_instance_uid": row["study_instance_uid"],
                                   "accession_number": row.get("accession_number") or None,
                                   "exam_at": stamp["exam_at"], "sources": {n: "synthetic" for n in ATTRIBUTES},
                                   "updated_at": stamp["exam_at"], **{n: row[n] or UNKNOWN for n in ATTRIBUTES}})
            if stamp["reported_at"] is not None:
                truth = [t.strip() for t in row["truth"].split(";") if t.strip()]
                report_rows.append({
                    "id": report_id, "study_instance_uid": row["study_instance_uid"],
                    "accession_number": row.get("accession_number") or None, "status": "F",
                    "exam_at": stamp["exam_at"], "reported_at": stamp["reported_at"],
                    "received_at": stamp["reported_at"], "source": "synthetic", "source_message_id": None,
                    "text": "Synthetic report. " + (", ".join(truth) if truth else "No abnormality.")})
                label_rows.extend({"report_id": report_id, "label": t.rstrip("?"),
                                   "value": -1 if t.endswith("?") else 1, "source": "synthetic",
                                   "evidence": None, "created_at": stamp["reported_at"]} for t in truth)
                report_id += 1
        for table, batch in ((studies, study_rows), (processing_runs, run_rows), (predictions, prediction_rows),
                             (study_attributes, attribute_rows), (reports, report_rows),
                             (ground_truth_labels, label_rows)):
            if batch:
                connection.execute(insert(table), batch)
        if connection.dialect.name == "postgresql":  # explicit ids: move the sequences past them
            for table in ("studies", "processing_runs", "reports"):
                connection.execute(text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))"))
    return len(rows)
