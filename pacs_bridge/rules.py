"""Routing rules: which pipeline, lane, completion and forwarding a study gets, from its tags and its sender.

The rules are configuration (``routing`` in ``triage.yaml``; every key is documented in ``worker.config``), tried
in order; the first whose ``match`` holds decides, and a fallback rule decides when none does::

    routing:
      rules:
        - name: brain-mr
          match:
            all:
              - {tag: Modality, equals: MR}
              - {tag: BodyPartExamined, regex: "(?i)^(brain|head)$"}
              - {not: {tag: calling_aet, equals: RESEARCH}}
          pipeline: neuro_mri            # neuro_mri | slice_knn | ignore
          lane: urgent                   # urgent | routine
          quiet_period_s: 30             # optional: this study's quiet period
          max_wait_s: 1800               # optional: this study's hard maximum
          expected_series: ["(?i)flair", "(?i)dwi"]   # optional: complete as soon as all are present
          forward:                       # optional: send the study's images as received
            - {to: [research-archive], stage: before}
            - {to: [neuro-oncall], stage: after, if: {result: priority, equals: stat}}
      fallback: {name: fallback, pipeline: ignore}

A condition is ``{all: [...]}``, ``{any: [...]}``, ``{not: ...}`` or a test of one attribute with one operator:
``equals`` (a value or a list of values), ``regex`` (Python ``re.search``), ``range`` (``[low, high]``, inclusive,
``null`` for an open end; numbers, and ages such as ``057Y``) or ``present`` (true/false). The attribute is
``tag:`` a DICOM keyword (``Modality``, ``BodyPartExamined``, ``StudyDescription``, ``SeriesDescription``,
``Manufacturer``, any other non-sequence attribute) or one of the association's :data:`ASSOCIATION_ATTRIBUTES`;
in a forward's ``if``, ``result:`` one of :data:`RESULT_ATTRIBUTES`.

A study has many values of an attribute (one per image series; a multi-valued element contributes each value), and
a test holds when **any** value passes it: ``{tag: Modality, equals: CT}`` means "the study has a CT series", so
``{not: {tag: Modality, equals: CT}}`` means "no CT series". Derived objects (SRs, key objects, presentation
states) contribute no values: they are not what a rule is about, and loop prevention
(:mod:`pacs_bridge.routing`) keeps them from ever being processed or forwarded.

Every evaluation returns the reason it holds or fails, in words an operator can check against the images: the
routing event names the rule and why, and ``triage rules test FILE...`` prints the same for files on disk.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

PIPELINES = ("neuro_mri", "slice_knn", "ignore")
LANES = ("urgent", "routine")
STAGES = ("before", "after")

#: Attributes of how a study arrived rather than what is in it (one value per series, as it was received).
ASSOCIATION_ATTRIBUTES = {
    "calling_aet": "the sender's AE title (C-STORE, C-MOVE/C-GET: the PACS's)",
    "called_aet": "the AE title the sender addressed (ours, or an alias routed to us)",
    "peer_address": "the sender's IP address",
    "source": "how it arrived: c-store, stow-rs, c-get or wado-rs",
}

#: Attributes of an AI result, for conditions on forwarding after processing.
RESULT_ATTRIBUTES = {
    "priority": "worklist priority: routine, urgent or stat",
    "findings": "diagnoses at or above their threshold (none: no finding)",
    "reported": "every diagnosis the SR reports (above threshold, topped up to model.report_top_k)",
    "referrals": "specialist referrals reported",
    "model_name": "the model family",
    "model_version": "the model bundle's version",
    "probability:LABEL": "the probability of diagnosis LABEL (0-1)",
}

_OPERATORS = ("equals", "regex", "range", "present")
_RULE_KEYS = {"name", "match", "pipeline", "lane", "quiet_period_s", "max_wait_s", "expected_series", "forward"}
_FORWARD_KEYS = {"to", "stage", "if"}
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_AGE_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


class RuleError(ValueError):
    """A routing configuration that cannot be used; the message names the rule and the offending entry."""


class Facts(Protocol):
    """What conditions are evaluated on: values of named attributes, each with where it came from."""

    def values(self, name: str) -> list[tuple[str, str]]:
        """``(value, where)`` pairs; ``where`` says which series (or result) the value is from."""


@dataclass(frozen=True)
class Verdict:
    holds: bool
    why: str


# -- conditions --------------------------------------------------------------------------------------------------
class Condition:
    """A compiled condition; :meth:`evaluate` says whether it holds and why."""

    def evaluate(self, facts: Facts) -> Verdict:
        raise NotImplementedError

    def attribute_names(self) -> set[str]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class AllOf(Condition):
    parts: tuple[Condition, ...]

    def evaluate(self, facts: Facts) -> Verdict:
        reasons = []
        for part in self.parts:
            verdict = part.evaluate(facts)
            if not verdict.holds:
                return Verdict(False, verdict.why)
            reasons.append(verdict.why)
        return Verdict(True, " and ".join(reasons) or "no condition")

    def attribute_names(self) -> set[str]:
        return set().union(*(p.attribute_names() for p in self.parts)) if self.parts else set()

    def describe(self) -> str:
        return "(" + " and ".join(p.describe() for p in self.parts) + ")"


@dataclass(frozen=True)
class AnyOf(Condition):
    parts: tuple[Condition, ...]

    def evaluate(self, facts: Facts) -> Verdict:
        reasons = []
        for part in self.parts:
            verdict = part.evaluate(facts)
            if verdict.holds:
                return verdict
            reasons.append(verdict.why)
        return Verdict(False, "none of: " + "; ".join(reasons))

    def attribute_names(self) -> set[str]:
        return set().union(*(p.attribute_names() for p in self.parts)) if self.parts else set()

    def describe(self) -> str:
        return "(" + " or ".join(p.describe() for p in self.parts) + ")"


@dataclass(frozen=True)
class Not(Condition):
    part: Condition

    def evaluate(self, facts: Facts) -> Verdict:
        verdict = self.part.evaluate(facts)
        # The part's failure is the reason its negation holds ("no Modality equals 'CT' (values: 'MR')").
        return Verdict(not verdict.holds, verdict.why if not verdict.holds else f"excluded because {verdict.why}")

    def attribute_names(self) -> set[str]:
        return self.part.attribute_names()

    def describe(self) -> str:
        return f"not {self.part.describe()}"


@dataclass(frozen=True)
class Test(Condition):
    """One attribute, one operator: holds when any of the attribute's values passes."""

    attribute: str
    operator: str
    operand: Any

    def evaluate(self, facts: Facts) -> Verdict:
        values = [(v, where) for v, where in facts.values(self.attribute) if v != ""]
        if self.operator == "present":
            found = bool(values)
            shown = (f"{self.attribute} {_quote(values[0][0])} present{_where(values[0][1])}" if found
                     else f"{self.attribute} absent or empty")
            return Verdict(found == self.operand, shown)
        for value, where in values:
            if self._passes(value):
                return Verdict(True, f"{self.attribute} {_quote(value)} {self._phrase()}{_where(where)}")
        seen = sorted({v for v, _ in values})
        found = ", ".join(_quote(v) for v in seen[:6]) + (", ..." if len(seen) > 6 else "") if seen else "none"
        return Verdict(False, f"no {self.attribute} {self._phrase()} (values: {found})")

    def _passes(self, value: str) -> bool:
        if self.operator == "equals":
            return value in self.operand
        if self.operator == "regex":
            return self.operand.search(value) is not None
        number = as_number(value)
        if number is None:
            return False
        low, high = self.operand
        return (low is None or number >= low) and (high is None or number <= high)

    def _phrase(self) -> str:
        if self.operator == "equals":
            items = sorted(self.operand)
            return f"equals {_quote(items[0])}" if len(items) == 1 else \
                "is one of " + ", ".join(_quote(v) for v in items)
        if self.operator == "regex":
            return f"matches /{self.operand.pattern}/"
        low, high = self.operand
        if low is None:
            return f"<= {high:g}"
        if high is None:
            return f">= {low:g}"
        return f"in range [{low:g}, {high:g}]"

    def attribute_names(self) -> set[str]:
        return {self.attribute}

    def describe(self) -> str:
        if self.operator == "present":
            return f"{self.attribute} {'present' if self.operand else 'absent'}"
        return f"{self.attribute} {self._phrase()}"


def _quote(value: str) -> str:
    return repr(value)


def _where(where: str) -> str:
    return f" ({where})" if where else ""


def as_number(value: str) -> float | None:
    """A numeric reading of an attribute value: numbers as written, ages (AS, ``057Y``) in years."""
    text = value.strip()
    age = _AGE.match(text)
    if age:
        return int(age.group(1)) * _AGE_YEARS[age.group(2)]
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def compile_condition(raw: Any, kinds: tuple[str, ...] = ("tag",), where: str = "condition") -> Condition:
    """Compile a condition from its configuration; raise :class:`RuleError` naming ``where`` and the problem.

    ``kinds`` are the attribute kinds allowed: ``tag`` (DICOM keywords and association attributes) in a rule's
    ``match``, ``result`` in a forward's ``if``.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise RuleError(f"{where}: a condition must be a mapping such as {{tag: Modality, equals: MR}}, "
                        f"not {raw!r}")
    combinators = [k for k in ("all", "any", "not") if k in raw]
    if combinators:
        if len(raw) != 1:
            raise RuleError(f"{where}: {combinators[0]!r} must be alone in its mapping, found {sorted(raw)}")
        key = combinators[0]
        if key == "not":
            return Not(compile_condition(raw["not"], kinds, f"{where}.not"))
        parts = raw[key]
        if not isinstance(parts, Sequence) or isinstance(parts, str) or not parts:
            raise RuleError(f"{where}.{key}: expected a non-empty list of conditions, not {parts!r}")
        compiled = tuple(compile_condition(p, kinds, f"{where}.{key}[{i}]") for i, p in enumerate(parts))
        return AllOf(compiled) if key == "all" else AnyOf(compiled)

    kind = [k for k in ("tag", "result") if k in raw]
    if len(kind) != 1:
        raise RuleError(f"{where}: expected one of all/any/not or an attribute test with "
                        f"{' or '.join(repr(k) for k in kinds)}, found keys {sorted(raw)}")
    kind = kind[0]
    if kind not in kinds:
        allowed = "DICOM tags and association attributes" if kind == "result" else "AI result attributes"
        raise RuleError(f"{where}: {kind!r} conditions are not allowed here (only {allowed})")
    attribute = raw[kind]
    if not isinstance(attribute, str) or not attribute:
        raise RuleError(f"{where}: {kind} must be a name, not {attribute!r}")
    _check_attribute(kind, attribute, where)
    operators = [k for k in raw if k != kind]
    if len(operators) != 1 or operators[0] not in _OPERATORS:
        raise RuleError(f"{where}: expected exactly one operator of {', '.join(_OPERATORS)} beside "
                        f"{kind}: {attribute}, found {operators or 'none'}")
    operator = operators[0]
    operand = raw[operator]
    if operator == "equals":
        items = operand if isinstance(operand, (list, tuple)) else [operand]
        if not items or any(isinstance(v, (Mapping, list, tuple)) or v is None for v in items):
            raise RuleError(f"{where}: equals takes a value or a list of values, not {operand!r}")
        return Test(attribute, operator, frozenset(_text(v) for v in items))
    if operator == "regex":
        if not isinstance(operand, str):
            raise RuleError(f"{where}: regex takes a pattern string, not {operand!r}")
        try:
            return Test(attribute, operator, re.compile(operand))
        except re.error as exc:
            raise RuleError(f"{where}: regex {operand!r} does not compile: {exc}") from exc
    if operator == "range":
        if not isinstance(operand, (list, tuple)) or len(operand) != 2:
            raise RuleError(f"{where}: range takes [low, high] (null for an open end), not {operand!r}")
        bounds = []
        for bound in operand:
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
                raise RuleError(f"{where}: range bounds must be numbers or null, not {bound!r}")
            bounds.append(None if bound is None else float(bound))
        if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
            raise RuleError(f"{where}: range {operand!r} is empty (low > high)")
        return Test(attribute, operator, tuple(bounds))
    if not isinstance(operand, bool):
        raise RuleError(f"{where}: present takes true or false, not {operand!r}")
    return Test(attribute, operator, operand)


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _check_attribute(kind: str, name: str, where: str) -> None:
    if kind == "result":
        if name in RESULT_ATTRIBUTES or (name.startswith("probability:") and len(name) > len("probability:")):
            return
        raise RuleError(f"{where}: unknown result attribute {name!r}; known: {', '.join(RESULT_ATTRIBUTES)}")
    if name in ASSOCIATION_ATTRIBUTES:
        return
    tag = tag_for_keyword(name)
    if tag is None:
        raise RuleError(f"{where}: {name!r} is not a DICOM keyword (e.g. Modality, BodyPartExamined) nor one "
                        f"of {', '.join(ASSOCIATION_ATTRIBUTES)}")
    if dictionary_VR(tag) in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        raise RuleError(f"{where}: {name} is a sequence or binary attribute; rules test text and numbers")


# -- rules -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Forward:
    """Send the study's images, as received, to named destinations: on routing, or after processing if the
    result satisfies ``condition``."""

    destinations: tuple[str, ...]
    stage: str
    condition: Condition | None = None
    #: The condition as configured, kept with the run so the decision after processing uses the rule of its day.
    raw_condition: Mapping[str, Any] | None = None

    def describe(self) -> str:
        where = ", ".join(self.destinations)
        if self.stage == "before":
            return f"before processing -> {where}"
        return f"after processing -> {where}" + (f" if {self.condition.describe()}" if self.condition else "")

    def plan(self) -> dict[str, Any]:
        """The forward as configured (JSON), to store with a run and compile again with :func:`forward_from_plan`."""
        plan: dict[str, Any] = {"to": list(self.destinations), "stage": self.stage}
        if self.raw_condition is not None:
            plan["if"] = self.raw_condition
        return plan


@dataclass(frozen=True)
class Rule:
    name: str
    pipeline: str
    lane: str = "routine"
    condition: Condition | None = None  # None: the fallback (always holds)
    quiet_period_s: float | None = None
    max_wait_s: float | None = None
    expected_series: tuple[re.Pattern[str], ...] = ()
    forward: tuple[Forward, ...] = ()

    def forwards(self, stage: str) -> tuple[Forward, ...]:
        return tuple(f for f in self.forward if f.stage == stage)


@dataclass(frozen=True)
class RuleMatch:
    """The rule that decided, why, and what every rule tried before it said (for the rule tester)."""

    rule: Rule
    why: str
    tried: tuple[tuple[Rule, Verdict], ...] = ()


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    fallback: Rule = field(default_factory=lambda: Rule("fallback", "ignore"))

    @classmethod
    def from_config(cls, routing: Mapping[str, Any], destinations: Iterable[str] | None = None) -> "RuleSet":
        """Compile the ``routing`` configuration section; ``destinations`` (names) checks forward targets."""
        known = None if destinations is None else set(destinations)
        raw_rules = routing.get("rules") or []
        if not isinstance(raw_rules, Sequence) or isinstance(raw_rules, str):
            raise RuleError(f"routing.rules must be a list of rules, not {raw_rules!r}")
        rules = [_compile_rule(raw, f"routing.rules[{i}]", known, fallback=False) for i, raw in enumerate(raw_rules)]
        names = [r.name for r in rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RuleError(f"routing.rules: rule names must be unique; repeated: {', '.join(duplicates)}")
        fallback_raw = {k: v for k, v in (routing.get("fallback") or {}).items() if v is not None}
        fallback = _compile_rule({"name": "fallback", "pipeline": "ignore", **fallback_raw}, "routing.fallback",
                                 known, fallback=True)
        if fallback.name in names:
            raise RuleError(f"routing.fallback: its name {fallback.name!r} is also a rule's name")
        return cls(tuple(rules), fallback)

    def match(self, facts: Facts) -> RuleMatch:
        tried = []
        for rule in self.rules:
            verdict = rule.condition.evaluate(facts)
            tried.append((rule, verdict))
            if verdict.holds:
                return RuleMatch(rule, verdict.why, tuple(tried))
        why = "no rule matched" if self.rules else "no rules configured"
        return RuleMatch(self.fallback, why, tuple(tried))

    def tag_names(self) -> set[str]:
        """DICOM keywords the rules test (what must be read from the images)."""
        names = set().union(*(r.condition.attribute_names() for r in self.rules)) if self.rules else set()
        return {n for n in names if n not in ASSOCIATION_ATTRIBUTES}

    def rule(self, name: str) -> Rule | None:
        return next((r for r in (*self.rules, self.fallback) if r.name == name), None)


def _compile_rule(raw: Any, where: str, destinations: set[str] | None, fallback: bool) -> Rule:
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: a rule must be a mapping with name, match and pipeline, not {raw!r}")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise RuleError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_RULE_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RuleError(f"{where}: every rule needs a name")
    where = f"{where} ({name})"
    if fallback and "match" in raw:
        raise RuleError(f"{where}: the fallback has no match; it applies when no rule does")
    if not fallback and "match" not in raw:
        raise RuleError(f"{where}: no match condition (only the fallback applies unconditionally)")
    pipeline = raw.get("pipeline")
    if pipeline not in PIPELINES:
        raise RuleError(f"{where}: pipeline must be one of {', '.join(PIPELINES)}, not {pipeline!r}")
    lane = raw.get("lane") or "routine"
    if lane not in LANES:
        raise RuleError(f"{where}: lane must be one of {', '.join(LANES)}, not {lane!r}")
    timings = {}
    for key in ("quiet_period_s", "max_wait_s"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise RuleError(f"{where}: {key} must be a number of seconds >= 0, not {value!r}")
        timings[key] = None if value is None else float(value)
    patterns = raw.get("expected_series") or []
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise RuleError(f"{where}: expected_series is a list of SeriesDescription patterns, not {patterns!r}")
    expected = []
    for pattern in patterns:
        try:
            expected.append(re.compile(str(pattern)))
        except re.error as exc:
            raise RuleError(f"{where}: expected_series pattern {pattern!r} does not compile: {exc}") from exc
    forwards = []
    raw_forwards = raw.get("forward") or []
    if isinstance(raw_forwards, (str, Mapping)) or not isinstance(raw_forwards, Sequence):
        raise RuleError(f"{where}: forward is a list of {{to, stage, if}} entries, not {raw_forwards!r}")
    for i, entry in enumerate(raw_forwards):
        forwards.append(_compile_forward(entry, f"{where}.forward[{i}]", destinations))
    if pipeline == "ignore" and any(f.stage == "after" for f in forwards):
        raise RuleError(f"{where}: forwards after processing need a pipeline; this rule's is 'ignore'")
    condition = None if fallback else compile_condition(raw["match"], ("tag",), f"{where}.match")
    return Rule(name.strip(), pipeline, lane, condition, timings["quiet_period_s"], timings["max_wait_s"],
                tuple(expected), tuple(forwards))


def _compile_forward(raw: Any, where: str, destinations: set[str] | None) -> Forward:
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: expected {{to: [destination, ...], stage: before|after, if: condition}}")
    unknown = set(raw) - _FORWARD_KEYS
    if unknown:
        raise RuleError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_FORWARD_KEYS)}")
    targets = raw.get("to")
    targets = [targets] if isinstance(targets, str) else targets
    if not targets or not isinstance(targets, Sequence) or not all(isinstance(t, str) and t for t in targets):
        raise RuleError(f"{where}: 'to' names one destination or a list of them, not {raw.get('to')!r}")
    if destinations is not None:
        missing = [t for t in targets if t not in destinations]
        if missing:
            raise RuleError(f"{where}: destination(s) {missing} are not configured under 'destinations' "
                            f"(configured: {sorted(destinations) or 'none'})")
    stage = raw.get("stage", "after" if "if" in raw else "before")
    if stage not in STAGES:
        raise RuleError(f"{where}: stage must be before or after, not {stage!r}")
    condition = None
    if "if" in raw:
        if stage == "before":
            raise RuleError(f"{where}: 'if' tests the AI result, which exists only after processing (stage: after)")
        condition = compile_condition(raw["if"], ("result",), f"{where}.if")
    return Forward(tuple(dict.fromkeys(targets)), stage, condition, raw.get("if"))


def forward_from_plan(plan: Mapping[str, Any]) -> Forward:
    """A forward stored with a run (:meth:`Forward.plan`), compiled again for the decision after processing."""
    return _compile_forward(plan, "stored forward", None)


# -- facts -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesFacts:
    """One image series as the rules see it: attribute name -> values (strings), and a label for reasons."""

    series_instance_uid: str
    attributes: Mapping[str, tuple[str, ...]]
    instance_count: int = 0

    @property
    def label(self) -> str:
        description = (self.attributes.get("SeriesDescription") or ("",))[0]
        return f"series {description!r}" if description else f"series {self.series_instance_uid}"


@dataclass(frozen=True)
class StudyFacts:
    """A study as the rules see it: its image series, and the derived objects (which no rule ever sees)."""

    study_instance_uid: str
    series: tuple[SeriesFacts, ...]
    #: Modalities and SOP classes of every object, images and derived objects alike (for loop prevention).
    modalities: frozenset[str] = frozenset()
    sop_class_uids: frozenset[str] = frozenset()
    #: Notes on how the facts were gathered (a header that could not be read, say).
    notes: tuple[str, ...] = ()

    def values(self, name: str) -> list[tuple[str, str]]:
        return [(value, s.label) for s in self.series for value in s.attributes.get(name, ())]

    def series_descriptions(self) -> list[str]:
        return [d for s in self.series for d in s.attributes.get("SeriesDescription", ()) if d]


def dataset_values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """The values of ``keyword`` in ``ds`` as stripped strings; multi-valued elements give each value."""
    element = ds.get(keyword)
    if element is None or element == "":
        return ()
    items = list(element) if isinstance(element, (MultiValue, list, tuple)) else [element]
    values = []
    for item in items:
        if isinstance(item, (bytes, bytearray, Dataset)):
            continue
        text = str(item).replace("\x00", "").strip()
        if text:
            values.append(text)
    return tuple(values)


def series_facts_from_dataset(ds: Dataset, keywords: Iterable[str], association: Mapping[str, str | None],
                              instance_count: int = 0) -> SeriesFacts:
    """Facts of one series from one of its headers, plus how it arrived."""
    attributes: dict[str, tuple[str, ...]] = {k: dataset_values(ds, k) for k in set(keywords) | {"SeriesDescription"}}
    for name, value in association.items():
        attributes[name] = (str(value),) if value else ()
    return SeriesFacts(str(ds.get("SeriesInstanceUID", "")), attributes, instance_count)


@dataclass(frozen=True)
class ResultFacts:
    """An AI result as forward conditions see it."""

    attributes: Mapping[str, tuple[str, ...]]

    def values(self, name: str) -> list[tuple[str, str]]:
        return [(v, "") for v in self.attributes.get(name, ())]


def result_facts(result: Any, probabilities: Mapping[str, float] | None = None) -> ResultFacts:
    """Facts of a :class:`pacs_bridge.results.TriageResult`; ``probabilities`` adds every diagnosis's."""
    attributes: dict[str, tuple[str, ...]] = {
        "priority": (result.priority,),
        "findings": tuple(f.label for f in result.findings if f.positive),
        "reported": tuple(f.label for f in result.findings),
        "referrals": tuple(result.referrals),
        "model_name": (result.model_name,),
        "model_version": (result.model_version,),
    }
    for finding in result.findings:
        attributes[f"probability:{finding.label}"] = (repr(float(finding.probability)),)
    for label, p in (probabilities or {}).items():
        attributes[f"probability:{label}"] = (repr(float(p)),)
    return ResultFacts(attributes)
