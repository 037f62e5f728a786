"""Which pipeline a completed study goes to.

This is the built-in routing that always applies. Loop prevention comes first and cannot be configured away:
structured reports, key objects, presentation states and other derived non-image objects never trigger
processing, so an SR of ours that a PACS routes back to us is kept and ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Modalities of derived, non-image objects: never processed.
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "DOC", "ECG", "REG"})

#: SOP Class UID prefix shared by all structured reports (…88.x).
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def is_derived_object(modality: str, sop_class_uid: str) -> bool:
    """True for SRs, key objects, presentation states and the like: objects that must never trigger processing."""
    return modality in NON_IMAGE_MODALITIES or sop_class_uid.startswith(SR_SOP_CLASS_PREFIX)


@dataclass(frozen=True)
class StudySummary:
    """What routing looks at: the modalities and SOP classes of the study's instances."""

    modalities: frozenset[str]
    sop_class_uids: frozenset[str]


@dataclass(frozen=True)
class RoutingDecision:
    pipeline: str  # neuro_mri | slice_knn | ignore
    rule: str
    reason: str


def route_study(summary: StudySummary) -> RoutingDecision:
    image_modalities = summary.modalities - NON_IMAGE_MODALITIES
    image_classes = {uid for uid in summary.sop_class_uids if not uid.startswith(SR_SOP_CLASS_PREFIX)}
    if not image_modalities or not image_classes:
        return RoutingDecision(
            "ignore", "loop-prevention",
            f"no image objects (modalities {sorted(summary.modalities) or ['none']}): derived objects are never processed",
        )
    if "MR" in image_modalities:
        return RoutingDecision("neuro_mri", "mr-to-neuro", "MR images: Prima study encoder")
    return RoutingDecision(
        "ignore", "fallback", f"no pipeline for modalities {sorted(image_modalities)} in this configuration"
    )
