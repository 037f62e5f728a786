"""What every worklist publisher shares: the update it publishes, the scales it maps priorities onto, and the
rule that a publisher only ever raises a study's priority.

The AI speaks three levels (``routine``, ``urgent``, ``stat``, :data:`pacs_bridge.results.PRIORITIES`); each
system has its own values (UPS ``LOW/MEDIUM/HIGH``, HL7 ``R/A/S``, FHIR ``routine/urgent/asap/stat``). A
:class:`PriorityScale` maps the AI's level to one value of the system and ranks every value the system may
hold, so that "higher" means the same thing whichever clinician or system set it. Both are configuration:
which model output counts as which worklist level is a clinical decision (dicom-results.md §3, §5).

The rule (:meth:`PriorityRaiser.publish`): a target's priority is changed only when the AI's value ranks
strictly above the target's current value. A value the scale does not rank, or a current value that cannot be
read, is treated as possibly higher: then only the system's highest value is sent, since nothing can be
lowered by it (``when_current_unknown``). Every decision, including "left alone", comes back as a
:class:`Publication` with the original value and the reason, which the worker records so that a raise can be
reverted.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pacs_bridge.results import PRIORITIES

#: What a publisher does with a target whose current value it cannot read or rank.
UNKNOWN_POLICIES = ("top_only", "always", "never")

# Actions a Publication records.
RAISED = "raised"          # the target's priority was raised from ``original`` to ``new``
CREATED = "created"        # no target existed; one was created with ``new``
UNCHANGED = "unchanged"    # the target's priority is already as high or higher: left alone
SKIPPED = "skipped"        # nothing to act on (no target, target closed, policy)
NOTIFIED = "notified"      # a notification was sent (webhook)
FAILED = "failed"          # the target system refused or could not be reached
REVERTED = "reverted"      # an operator put the original value back


class PublisherError(Exception):
    """The target system could not be reached or refused the request; the message says which and why."""


class PublisherConfigError(ValueError):
    """A ``publishers`` entry is malformed; the message names the entry and the key."""


@dataclass(frozen=True)
class PriorityScale:
    """The AI levels mapped onto one system's priority values, and the rank of every value it uses."""

    levels: Mapping[str, str]
    ranks: Mapping[str, int]

    def __post_init__(self) -> None:
        missing = [p for p in PRIORITIES if p not in self.levels]
        if missing:
            raise PublisherConfigError(f"priority levels {dict(self.levels)} lack {missing}")
        unranked = [v for v in self.levels.values() if self.normalise(v) not in self._ranks]
        if unranked:
            raise PublisherConfigError(f"priority values {unranked} have no rank in {dict(self.ranks)}")
        ordered = [self.rank(self.levels[p]) for p in PRIORITIES]
        if ordered != sorted(ordered):
            raise PublisherConfigError(
                f"priority levels {dict(self.levels)} must not rank a higher AI level below a lower one")

    @property
    def _ranks(self) -> dict[str, int]:
        return {self.normalise(k): int(v) for k, v in self.ranks.items()}

    @staticmethod
    def normalise(value: str) -> str:
        return str(value).strip().upper()

    def value_for(self, ai_priority: str) -> str:
        if ai_priority not in self.levels:
            raise ValueError(f"AI priority {ai_priority!r} is not one of {PRIORITIES}")
        return self.levels[ai_priority]

    def rank(self, value: str | None) -> int | None:
        """The rank of ``value``; None for a value this scale does not know (then it may be anything)."""
        if value is None:
            return None
        return self._ranks.get(self.normalise(value))

    @property
    def top(self) -> int:
        return max(self._ranks.values())

    @classmethod
    def from_config(cls, defaults: Mapping[str, Any], entry: Mapping[str, Any]) -> PriorityScale:
        """Defaults for the kind, overridden by the entry's own ``levels``/``ranks``."""
        levels = {**defaults["levels"], **(entry.get("levels") or {})}
        ranks = {**defaults["ranks"], **(entry.get("ranks") or {})}
        return cls(levels, ranks)


@dataclass(frozen=True)
class PriorityUpdate:
    """One study's AI triage result as a priority change to publish. Holds no patient data except
    ``patient_id``, which HL7 order messages need in PID-3; it is never recorded or logged."""

    study_instance_uid: str
    priority: str
    reason: str
    accession_number: str | None = None
    study_description: str | None = None
    findings: tuple[tuple[str, float], ...] = ()
    referrals: tuple[str, ...] = ()
    model_name: str = ""
    model_version: str = ""
    run_id: int | None = None
    worklist_url: str | None = None
    patient_id: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority {self.priority!r} is not one of {PRIORITIES}")


@dataclass(frozen=True)
class Publication:
    """What one publisher did (or chose not to do) for one target, with the value it found there."""

    publisher: str
    kind: str
    target: str
    action: str
    ai_priority: str
    reason: str
    original: str | None = None
    new: str | None = None

    @property
    def changed(self) -> bool:
        return self.action in (RAISED, CREATED, REVERTED)

    def as_detail(self) -> dict[str, Any]:
        return {"publisher": self.publisher, "kind": self.kind, "target": self.target, "action": self.action,
                "ai_priority": self.ai_priority, "original": self.original, "new": self.new}


@dataclass(frozen=True)
class Target:
    """A worklist entry a publisher found for the study: its id, its current priority (None: unknown) and
    whatever the adapter needs to change it (a version tag, the resource)."""

    id: str
    current: str | None
    handle: Any = None
    #: Set when the entry may not be changed (completed, owned by a performer).
    closed_reason: str | None = None


def read_secret(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    """``<key>_file`` or ``<key>_env`` of a configuration entry: secrets never sit in the configuration."""
    if entry.get(f"{key}_file"):
        value = Path(entry[f"{key}_file"]).read_text().strip()
    elif entry.get(f"{key}_env"):
        value = os.environ.get(entry[f"{key}_env"], "").strip()
    else:
        return None
    if not value:
        source = entry.get(f"{key}_file") or entry.get(f"{key}_env")
        raise PublisherConfigError(f"{where}: {key} from {source} is empty")
    return value


class Publisher(ABC):
    """A destination for a study's AI priority. Configured, not subclassed per site."""

    kind: ClassVar[str]
    #: The kind's default mapping from AI levels to its values and the ranks of all its values.
    default_scale: ClassVar[Mapping[str, Any]]

    def __init__(self, name: str, scale: PriorityScale, timeout_s: float = 5.0) -> None:
        self.name = name
        self.scale = scale
        self.timeout_s = timeout_s

    @abstractmethod
    def publish(self, update: PriorityUpdate, last_known: str | None = None) -> list[Publication]:
        """Act on ``update``. ``last_known`` is the value this publisher last set or saw for the study
        (from the worker's records), which push-only systems use because they cannot be asked. Never raises
        for a refusal of the target system: that is a ``failed`` publication."""

    def _publication(self, target: str, action: str, update: PriorityUpdate, reason: str,
                     original: str | None = None, new: str | None = None) -> Publication:
        return Publication(self.name, self.kind, target, action, update.priority, reason, original, new)


class PriorityRaiser(Publisher):
    """A publisher that changes a priority held by another system, only ever upwards."""

    def __init__(self, name: str, scale: PriorityScale, timeout_s: float = 5.0,
                 when_current_unknown: str = "top_only") -> None:
        super().__init__(name, scale, timeout_s)
        if when_current_unknown not in UNKNOWN_POLICIES:
            raise PublisherConfigError(f"publisher {name!r}: when_current_unknown must be one of "
                                       f"{UNKNOWN_POLICIES}, not {when_current_unknown!r}")
        self.when_current_unknown = when_current_unknown

    @abstractmethod
    def find_targets(self, update: PriorityUpdate, last_known: str | None) -> list[Target]:
        """The study's open worklist entries in the target system, with their current priority."""

    @abstractmethod
    def set_priority(self, target: Target, value: str, update: PriorityUpdate, note: str) -> None:
        """Set ``target``'s priority to ``value``; raise :class:`PublisherError` if refused. ``note`` says
        what was changed and why, for systems that keep a note with the entry."""

    def create_target(self, update: PriorityUpdate, value: str, note: str) -> str | None:
        """Create a worklist entry when none exists; returns its id, or None when this publisher does not."""
        return None

    def publish(self, update: PriorityUpdate, last_known: str | None = None) -> list[Publication]:
        wanted = self.scale.value_for(update.priority)
        try:
            targets = self.find_targets(update, last_known)
        except PublisherError as exc:
            return [self._publication(self._study_label(update), FAILED, update, str(exc), new=wanted)]
        if not targets:
            try:
                created = self.create_target(update, wanted, self._note(None, wanted, update))
            except PublisherError as exc:
                return [self._publication(self._study_label(update), FAILED, update, str(exc), new=wanted)]
            if created is None:
                return [self._publication(self._study_label(update), SKIPPED, update,
                                          "no open worklist entry for the study")]
            return [self._publication(created, CREATED, update,
                                      f"created with priority {wanted}: {update.reason}", None, wanted)]
        return [self._publish_one(target, wanted, update) for target in targets]

    def _publish_one(self, target: Target, wanted: str, update: PriorityUpdate) -> Publication:
        if target.closed_reason:
            return self._publication(target.id, SKIPPED, update, target.closed_reason, target.current)
        decision, why = self.decide(target.current, wanted)
        if not decision:
            return self._publication(target.id, UNCHANGED, update, why, target.current)
        try:
            self.set_priority(target, wanted, update, self._note(target.current, wanted, update))
        except PublisherError as exc:
            return self._publication(target.id, FAILED, update, str(exc), target.current, wanted)
        return self._publication(target.id, RAISED, update, f"{why}: {update.reason}", target.current, wanted)

    def decide(self, current: str | None, wanted: str) -> tuple[bool, str]:
        """Whether to replace ``current`` by ``wanted``, and why. The whole raise-only rule is here."""
        wanted_rank, current_rank = self.scale.rank(wanted), self.scale.rank(current)
        if current_rank is not None:
            if wanted_rank > current_rank:
                return True, f"raised {current} -> {wanted}"
            return False, f"current priority {current} is not lower than {wanted}: never lowered"
        what = "unknown" if current is None else f"{current!r}, which the scale does not rank,"
        if self.when_current_unknown == "always":
            return True, f"current priority {what} (when_current_unknown: always); set {wanted}"
        if self.when_current_unknown == "top_only" and wanted_rank == self.scale.top:
            return True, f"current priority {what}; {wanted} is the highest value, so nothing can be lowered"
        return False, (f"current priority {what}: {wanted} might lower it, so it is not sent "
                       f"(when_current_unknown: {self.when_current_unknown})")

    def revert(self, target_id: str, original: str | None, expected_current: str | None,
               update: PriorityUpdate) -> Publication:
        """Put ``original`` back, but only if the target still holds the value we set (``expected_current``):
        a clinician's later change is never overwritten."""
        if original is None:
            return self._publication(target_id, SKIPPED, update,
                                     "no original value recorded: nothing to revert to")
        try:
            targets = {t.id: t for t in self.find_targets(update, expected_current)}
        except PublisherError as exc:
            return self._publication(target_id, FAILED, update, str(exc), expected_current, original)
        target = targets.get(target_id)
        if target is None:
            return self._publication(target_id, SKIPPED, update, "the worklist entry is gone or closed")
        if target.closed_reason:
            return self._publication(target_id, SKIPPED, update, target.closed_reason, target.current)
        if self.scale.normalise(target.current or "") != self.scale.normalise(expected_current or ""):
            return self._publication(target_id, SKIPPED, update,
                                     f"priority is now {target.current}, not the {expected_current} we set: "
                                     "changed since, left alone", target.current)
        note = (f"Priority {expected_current} set by AI triage reverted to {original} by an operator")
        try:
            self.set_priority(target, original, update, note)
        except PublisherError as exc:
            return self._publication(target_id, FAILED, update, str(exc), target.current, original)
        return self._publication(target_id, REVERTED, update, note, target.current, original)

    def _note(self, current: str | None, wanted: str, update: PriorityUpdate) -> str:
        origin = f"from {current} " if current else ""
        model = f"{update.model_name} {update.model_version}".strip()
        return f"Priority raised {origin}to {wanted} by AI triage ({model}): {update.reason}"

    @staticmethod
    def _study_label(update: PriorityUpdate) -> str:
        return update.accession_number or update.study_instance_uid
