"""Which pipeline a study goes to, in which lane, when it is complete and where its images are forwarded.

Loop prevention comes first and cannot be configured away: structured reports, key objects, presentation states
and other derived non-image objects never trigger processing nor forwarding, so an SR of ours that a PACS routes
back to us is kept and ignored (``shared/reference/dicom-results.md`` §7). Everything else is decided by the
configured rules (:mod:`pacs_bridge.rules`): the first that matches, else the fallback.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pacs_bridge.rules import Forward, RuleSet, StudyFacts

#: Modalities of derived, non-image objects: never processed.
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "DOC", "ECG", "REG"})

#: SOP Class UID prefix shared by all structured reports (…88.x).
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

#: The name under which loop prevention's decisions are recorded.
LOOP_PREVENTION = "loop-prevention"

#: The rules that apply when the configuration names none: MR to the brain-MRI pipeline, anything else ignored.
DEFAULT_RULES = RuleSet.from_config({
    "rules": [{"name": "mr-to-neuro", "match": {"tag": "Modality", "equals": "MR"}, "pipeline": "neuro_mri"}],
})


def is_derived_object(modality: str, sop_class_uid: str) -> bool:
    """True for SRs, key objects, presentation states and the like: objects that must never trigger processing."""
    return modality in NON_IMAGE_MODALITIES or sop_class_uid.startswith(SR_SOP_CLASS_PREFIX)


@dataclass(frozen=True)
class RoutingDecision:
    pipeline: str  # neuro_mri | slice_knn | ignore
    rule: str
    reason: str
    lane: str = "routine"
    quiet_period_s: float | None = None
    max_wait_s: float | None = None
    expected_series: tuple[re.Pattern[str], ...] = ()
    forward: tuple[Forward, ...] = ()

    def forwards(self, stage: str) -> tuple[Forward, ...]:
        return tuple(f for f in self.forward if f.stage == stage)

    def detail(self) -> dict:
        """The decision as recorded in the routing event (and, for what happens after processing, the run)."""
        return {
            "rule": self.rule, "pipeline": self.pipeline, "lane": self.lane, "why": self.reason,
            "quiet_period_s": self.quiet_period_s, "max_wait_s": self.max_wait_s,
            "expected_series": [p.pattern for p in self.expected_series],
            "forward": [f.plan() for f in self.forward],
        }


def route(facts: StudyFacts, rules: RuleSet = DEFAULT_RULES) -> RoutingDecision:
    """Decide for a study: loop prevention first, then the first matching rule, else the fallback."""
    if not facts.series:
        present = sorted(facts.modalities) or ["none"]
        return RoutingDecision(
            "ignore", LOOP_PREVENTION,
            f"no image objects (modalities {', '.join(present)}): derived objects are never processed or forwarded",
        )
    match = rules.match(facts)
    rule = match.rule
    return RoutingDecision(rule.pipeline, rule.name, match.why, rule.lane, rule.quiet_period_s, rule.max_wait_s,
                           rule.expected_series, rule.forward)


def expected_series_present(decision: RoutingDecision, facts: StudyFacts) -> dict[str, str | None]:
    """For each expected SeriesDescription pattern, the first present series that matches it (None if none)."""
    descriptions = facts.series_descriptions()
    return {
        pattern.pattern: next((d for d in descriptions if pattern.search(d)), None)
        for pattern in decision.expected_series
    }
