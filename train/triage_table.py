"""The diagnosis -> priority -> referral table: what each finding means for the worklist and whom it concerns.

Prima's published mapping (its paper's Supplementary Table 3) is not public, so the shipped table
``train/data/diagnosis_triage.csv`` is our own, written from general neuroradiology practice; each row carries
its clinical reasoning. It is a clinical configuration, not a fact: a site replaces it with its own file
(``training.triage_table`` in the configuration) after review by its clinical leads.

Rules: a study's priority is the highest priority of its positive diagnoses ("none" when it has none); its
referrals are the union of theirs. The table gives the priority and referral heads their training targets
from the diagnosis ground truth, and is written into every bundle the training makes.
"""
from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.labels import DIAGNOSIS_NAMES, PRIORITY_CLASSES, REFERRALS

SHIPPED_TABLE = Path(__file__).resolve().parent / "data" / "diagnosis_triage.csv"


@dataclass(frozen=True)
class TriageTable:
    priority: dict[str, str]  # diagnosis -> priority class
    referrals: dict[str, tuple[str, ...]]  # diagnosis -> referral targets
    reasoning: dict[str, str]
    source: str  # where the table was read from
    priority_classes: tuple[str, ...] = PRIORITY_CLASSES
    referral_names: tuple[str, ...] = REFERRALS

    def study_priority(self, positives: Iterable[str]) -> str:
        """The highest priority among the positive diagnoses ("none" without any)."""
        rank = {name: i for i, name in enumerate(self.priority_classes)}
        best = self.priority_classes[0]
        for label in positives:
            candidate = self.priority[label]
            if rank[candidate] > rank[best]:
                best = candidate
        return best

    def study_referrals(self, positives: Iterable[str]) -> tuple[str, ...]:
        wanted = {r for label in positives for r in self.referrals[label]}
        return tuple(r for r in self.referral_names if r in wanted)

    def targets(
        self, diagnosis_matrix: np.ndarray, diagnosis_names: Sequence[str] = DIAGNOSIS_NAMES
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) 0/1 diagnosis labels -> (N,) priority class index and (N, R) 0/1 referral labels."""
        priority = np.zeros(len(diagnosis_matrix), dtype=np.int64)
        referral = np.zeros((len(diagnosis_matrix), len(self.referral_names)), dtype=np.float32)
        index = {r: i for i, r in enumerate(self.referral_names)}
        for row, labels in enumerate(diagnosis_matrix):
            positives = [name for name, value in zip(diagnosis_names, labels) if value > 0.5]
            priority[row] = self.priority_classes.index(self.study_priority(positives))
            for r in self.study_referrals(positives):
                referral[row, index[r]] = 1.0
        return priority, referral

    def to_manifest(self) -> dict:
        """The table as it goes into a bundle's manifest (``triage_table``)."""
        return {
            "source": self.source,
            "priority": dict(self.priority),
            "referrals": {k: list(v) for k, v in self.referrals.items()},
        }


def load_triage_table(
    path: str | Path | None = None,
    diagnosis_names: Sequence[str] = DIAGNOSIS_NAMES,
    priority_classes: Sequence[str] = PRIORITY_CLASSES,
    referral_names: Sequence[str] = REFERRALS,
) -> TriageTable:
    """Read and check a table (the shipped one when ``path`` is empty): every diagnosis exactly once, known
    priority classes and referral targets. Errors name the file, the row and what is wrong."""
    source = Path(path) if path else SHIPPED_TABLE
    priority: dict[str, str] = {}
    referrals: dict[str, tuple[str, ...]] = {}
    reasoning: dict[str, str] = {}
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        missing_columns = {"diagnosis", "priority", "referrals"} - set(reader.fieldnames or ())
        if missing_columns:
            raise ValueError(f"{source}: missing columns {sorted(missing_columns)}")
        for line, row in enumerate(reader, start=2):
            name = row["diagnosis"].strip()
            if name not in diagnosis_names:
                raise ValueError(f"{source}:{line}: unknown diagnosis {name!r}")
            if name in priority:
                raise ValueError(f"{source}:{line}: {name} appears twice")
            level = row["priority"].strip()
            if level not in priority_classes:
                raise ValueError(f"{source}:{line}: priority {level!r} is not one of {list(priority_classes)}")
            targets = tuple(t.strip() for t in (row["referrals"] or "").split(";") if t.strip())
            unknown = [t for t in targets if t not in referral_names]
            if unknown:
                raise ValueError(f"{source}:{line}: unknown referral {unknown}; known: {list(referral_names)}")
            priority[name], referrals[name] = level, targets
            reasoning[name] = (row.get("reasoning") or "").strip()
    absent = [name for name in diagnosis_names if name not in priority]
    if absent:
        raise ValueError(f"{source}: no row for {absent}; every diagnosis needs a priority")
    return TriageTable(priority, referrals, reasoning, str(source), tuple(priority_classes), tuple(referral_names))


def table_from_manifest(manifest: Mapping) -> TriageTable | None:
    data = manifest.get("triage_table")
    if not data:
        return None
    return TriageTable(
        dict(data["priority"]),
        {k: tuple(v) for k, v in data["referrals"].items()},
        {},
        str(data.get("source", "manifest")),
        tuple(manifest.get("priority_classes", PRIORITY_CLASSES)),
        tuple(manifest.get("referral_names", REFERRALS)),
    )
