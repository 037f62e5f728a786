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
    #: Below threshold and reported as explicitly absent (a label the site has the model rule out), rather than
    #: merely listed as part of the differential.
    reported_absent: bool = False

    def __post_init__(self) -> None:
        if self.reported_absent and self.positive:
            raise ValueError(f"finding {self.label!r} is at or above its threshold and cannot be reported absent")

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold

    @property
    def call(self) -> str:
        """What the model says of the finding: "present" (called), "absent" (ruled out) or "not called"."""
        return "present" if self.positive else "absent" if self.reported_absent else "not called"


@dataclass(frozen=True)
class SimilarStudy:
    """A prior study found by the slice-embedding index: evidence for the radiologist."""

    #: The other study's UID: known to the worker, never written to an SR (it is another patient's study).
    study_instance_uid: str
    similarity: float
    findings: tuple[str, ...] = ()
    #: A pseudonymous reference to the other study (a keyed hash of its UID) that the SR carries instead, and that
    #: the worklist resolves for authorised users (worker.slice_evidence.resolve_study_references).
    reference: str = ""


@dataclass(frozen=True)
class ZeroShotFindings:
    """Findings scored from text prompts (zero-shot), reported beside the model's own findings.

    ``method`` and ``version`` identify the algorithm apart from the heads or the kNN (the SR gives these findings
    their own TID 4019 Algorithm Identification); ``parameters`` say how it was run (prompt table, kNN weight).
    """

    method: str
    version: str
    findings: tuple[Finding, ...]
    parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.method.strip() or not self.version.strip():
            raise ValueError(f"zero-shot findings need a method and a version, got {self.method!r} "
                             f"{self.version!r}")
        for f in self.findings:
            if not 0.0 <= f.probability <= 1.0:
                raise ValueError(f"zero-shot finding {f.label!r} has probability {f.probability} outside 0..1")


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
    #: Zero-shot scores from the text tower, as findings of their own method (never raise the priority).
    zero_shot: ZeroShotFindings | None = None

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority {self.priority!r} is not one of {PRIORITIES}")
        for f in self.findings:
            if not 0.0 <= f.probability <= 1.0:
                raise ValueError(f"finding {f.label!r} has probability {f.probability} outside 0..1")


@dataclass(frozen=True)
class NotAnalysed:
    """A study the input adequacy gate turned away: no model result, and why (worker.input_gate)."""

    study_instance_uid: str
    pipeline: str
    reasons: tuple[str, ...]
    model_name: str = "prima"
    model_version: str = "unknown"

    def __post_init__(self) -> None:
        if not self.reasons or not all(r.strip() for r in self.reasons):
            raise ValueError(f"study {self.study_instance_uid}: a not-analysed outcome needs its reasons")
