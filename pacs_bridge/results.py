"""The triage result of one study: what the model said, in the form every output shares.

This is plain data with no torch in it. The worker builds it from the model's outputs; the SR writer
(:mod:`pacs_bridge.sr`) encodes it as a DICOM Structured Report and reads it back to an equal object; the
worklist publishers and the database read it too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: Worklist priority levels, lowest first. The model's own classes (Prima: none/low/high) map onto these
#: through a clinical configuration; the SR codes them as SCT Routine/Urgent/Stat.
PRIORITIES = ("routine", "urgent", "stat")


@dataclass(frozen=True)
class ImageRegion:
    """A region of one source image that drove a finding (from the token explanation).

    ``polygon`` holds 2-D pixel coordinates (column, row) with (0, 0) at the top-left corner of the top-left
    pixel, as DICOM SCOORD does; the polygon is closed (first point repeated last).
    """

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    polygon: tuple[tuple[float, float], ...]
    weight: float


@dataclass(frozen=True)
class Finding:
    """One diagnosis of the differential: model label, probability (0-1) and the operating threshold."""

    label: str
    probability: float
    threshold: float
    regions: tuple[ImageRegion, ...] = ()

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class SimilarStudy:
    """A prior study found by the slice-embedding index: evidence for the radiologist."""

    study_instance_uid: str
    similarity: float
    findings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TriageResult:
    """What the triage says about one study version."""

    study_instance_uid: str
    priority: str
    findings: tuple[Finding, ...]
    referrals: tuple[str, ...] = ()
    model_name: str = "prima"
    model_version: str = "unknown"
    priority_scores: dict[str, float] = field(default_factory=dict)
    similar_studies: tuple[SimilarStudy, ...] = ()

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority {self.priority!r} is not one of {PRIORITIES}")
        for f in self.findings:
            if not 0.0 <= f.probability <= 1.0:
                raise ValueError(f"finding {f.label!r} has probability {f.probability} outside 0..1")
