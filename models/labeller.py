"""Report labeller: radiology report text -> the 52 Prima diagnosis labels, as present, absent or uncertain.

The default :class:`KeywordLabeller` finds each diagnosis by the patterns in ``models/data/label_patterns.csv``
(regular expressions, case-insensitive; several rows per label) and decides whether each mention is asserted,
negated or hedged with NegEx-style trigger phrases (Chapman et al., J Biomed Inform 2001), applied per clause:

- a *pre* trigger ("no", "without", "negative for", "possible", "cannot exclude", ...) governs the mentions after
  it up to the end of its clause or a termination term ("but", "however", "which", ...);
- a *post* trigger ("... is not seen", "... has resolved", "... cannot be excluded", "... is suspected") governs a
  mention a few words before it, within the same comma-delimited phrase;
- pseudo-triggers ("no interval change in", "not significantly changed", "to suggest") look like negation but are
  not, and are masked first; where trigger phrases overlap the longest wins, so "cannot be excluded" is hedging,
  not negation.

Per report a label is present (1) if any mention asserts it, else uncertain (-1) if any mention hedges it, else
absent (0) if it is only mentioned negated; unmentioned labels are not returned. Sections that describe the
request rather than the findings (indication, clinical history, comparison, technique) are not labelled.

A better labeller (a fine-tuned language model, say) plugs in by implementing :class:`ReportLabeller`.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from models.labels import DIAGNOSIS_NAMES

PRESENT, ABSENT, UNCERTAIN = 1, 0, -1
DEFAULT_PATTERNS = Path(__file__).resolve().parent / "data" / "label_patterns.csv"


@dataclass(frozen=True)
class Mention:
    """A diagnosis label read from a report: its value (1 present, 0 absent, -1 uncertain) and the sentence."""

    label: str
    value: int
    evidence: str | None = None


class ReportLabeller(Protocol):
    """Anything that turns report text into labels; ``name`` is stored as the labels' source."""

    name: str

    def label(self, text: str) -> Sequence[Mention]:
        """One mention per label the report speaks of (present, absent or uncertain)."""
        ...


# Trigger phrases. Kinds: neg_pre, neg_post, unc_pre, unc_post, pseudo, stop (ends a pre trigger's scope).
_TRIGGERS: dict[str, tuple[str, ...]] = {
    "pseudo": (
        r"no (significant |appreciable |definite )?(interval )?(change|increase|decrease|growth|progression|enlargement)",
        r"not (significantly |substantially )?changed",
        r"not (only|necessarily)",
        r"(no|without) (evidence|findings|signs?) (to suggest|of interval)",
        r"to suggest",
        r"not (previously )?seen (previously|before|on (the )?prior)",
        r"gram[- ]negative",
    ),
    "neg_pre": (
        r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\bnegative for\b", r"\bneither\b", r"\bnor\b", r"\bnever\b",
        r"\babsence of\b", r"\bfree of\b", r"\b(ruled|rules) out\b", r"\b(interval )?(removal|resolution) of\b",
        r"\bexclude[sd]?\b",
    ),
    "neg_post": (
        (r"(is|are|was|were) (not|no longer) (seen|present|identified|visuali[sz]ed|evident|demonstrated"
         r"|appreciated|detected|noted|apparent)"),
        r"\bnot (seen|present|identified|visuali[sz]ed|evident|demonstrated|appreciated|detected)\b",
        r"(has|have|had) (now |since |completely )?resolved",
        r"(is|are|was|were) (now )?(absent|resolved|excluded|ruled out)",
        r"(has|have|had) been (excluded|ruled out|removed)",
        r"\bruled out\b",
        r"((is|are|was|were) )?(thought |considered |felt )?\bunlikely\b",
    ),
    "unc_pre": (
        r"\bpossibl[ey]\b", r"\bprobabl[ey]\b", r"\b(less |more |most )?likely\b",
        r"\b(may|might|could|can) (also )?(represent|reflect|be|indicate|relate to|correspond to|suggest)\b",
        r"\b(cannot|can not|can't|could not) (exclude|rule out)\b",
        r"\b(suspicious|concerning|worrisome|worrying) (for|of)\b",
        r"\b(raises?|raising) (the )?(concern|possibility|question|suspicion) (for|of)\b",
        r"\bconcern for\b", r"\bsuspect(ed)?\b", r"\bsuspicion (for|of)\b", r"\bquestion(able)?( of)?\b",
        r"\bequivocal\b", r"\bdifferential( diagnosis)?( (includes?|considerations? include))?\b",
        r"\bversus\b", r"\bvs\b\.?", r"\?", r"\bquery\b", r"\bpresum(ed|ably)\b", r"\bindeterminate\b",
        r"\bsuggest(s|ive of|ing|ion of)?\b", r"\bfavou?r(ed|s)?( to be| over)?\b", r"\bconsider(ed)?\b",
        r"\bcorrelate (clinically )?for\b", r"\brather than\b", r"\bnot excluded\b",
    ),
    "unc_post": (
        r"(cannot|can not|can't|could not) be (excluded|ruled out)",
        r"(is|are|was|were) not (excluded|ruled out)",
        r"\bnot excluded\b",
        (r"(is|are) (also )?(considered )?(possible|likely|less likely( than)?|more likely( than)?|suspected"
         r"|questioned|considered|favou?red( over)?|a consideration|a possibility|in the differential|thought)"),
        r"(is|are) (the )?(main |leading |primary )?(differential )?considerations?",
        r"(the )?(main |leading )?considerations?\b",
        r"as a differential", r"\?", r"\bversus\b", r"\bvs\b\.?",
    ),
    "stop": (
        r"\b(but|however|although|though|except|whereas|while|which|nevertheless|yet)\b",
        r"\b(apart|aside) from\b", r"\bthere (is|are)\b", r"\bin addition\b",
    ),
}
_COMPILED = {kind: [re.compile(p, re.IGNORECASE) for p in patterns] for kind, patterns in _TRIGGERS.items()}
_POST_WINDOW_WORDS = 6
_COMPARISON = re.compile(r"\b(than|over)$", re.IGNORECASE)
_SKIPPED_SECTIONS = {"indication", "indications", "clinical history", "history", "clinical information",
                     "clinical details", "reason for exam", "reason for examination", "reason for study",
                     "comparison", "comparisons", "technique", "protocol", "procedure"}
_HEADING = re.compile(r"^\s*([A-Za-z][A-Za-z /]{1,40}?)\s*:\s*")
_SENTENCE_END = re.compile(r"(?<=[.!])\s+(?=[A-Z0-9?(\[])|\n+")


@dataclass(frozen=True)
class _Span:
    kind: str
    start: int
    end: int


def load_patterns(path: str | Path = DEFAULT_PATTERNS,
                  labels: Iterable[str] = DIAGNOSIS_NAMES) -> dict[str, list[re.Pattern[str]]]:
    """label -> compiled patterns from a CSV with columns ``label,pattern``; unknown labels are an error."""
    known = set(labels)
    table: dict[str, list[re.Pattern[str]]] = {}
    with Path(path).open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            label, pattern = row["label"].strip(), row["pattern"].strip()
            if label not in known:
                raise ValueError(f"{path} line {line}: {label!r} is not one of the {len(known)} diagnosis labels")
            try:
                table.setdefault(label, []).append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                raise ValueError(f"{path} line {line}: pattern {pattern!r} for {label} is invalid: {exc}") from exc
    return table


def findings_text(text: str) -> str:
    """The report without the sections that describe the request (indication, history, comparison, technique)."""
    kept: list[str] = []
    skipping = False
    for line in text.replace("\r", "\n").split("\n"):
        heading = _HEADING.match(line)
        if heading:
            skipping = heading.group(1).strip().lower() in _SKIPPED_SECTIONS
            line = line[heading.end():] if not skipping else ""
        if not skipping and line.strip():
            kept.append(line.strip())
    return "\n".join(kept)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(findings_text(text)) if s and s.strip()]


def clauses(sentence: str) -> list[str]:
    return [c for c in re.split(r"[;:]", sentence) if c.strip()]


def _triggers(clause: str) -> list[_Span]:
    candidates = [_Span(kind, m.start(), m.end()) for kind, patterns in _COMPILED.items() for pattern in patterns
                  for m in pattern.finditer(clause) if m.end() > m.start()]
    # Longest first, so "cannot be excluded" (hedging) beats "excluded" (negation) and pseudo-triggers mask.
    candidates.sort(key=lambda s: (-(s.end - s.start), s.start))
    accepted: list[_Span] = []
    for span in candidates:
        # A phrase that can act both ways ("versus", "?") is kept once per kind.
        if all(span.end <= other.start or span.start >= other.end
               or (span.start, span.end) == (other.start, other.end) for other in accepted):
            accepted.append(span)
    return sorted((s for s in accepted if s.kind != "pseudo"), key=lambda s: s.start)


def _state(clause: str, start: int, end: int, triggers: list[_Span]) -> int:
    stops = [t for t in triggers if t.kind == "stop"]
    # A comparison ("A is favoured over B", "A is less likely than B") hedges both of its sides.
    pre = [t for t in triggers if t.end <= start and not any(t.end <= s.start and s.end <= start for s in stops)
           and (t.kind in ("neg_pre", "unc_pre") or (t.kind == "unc_post" and _COMPARISON.search(clause[t.start:t.end])))]
    post = []
    for t in triggers:
        if t.kind in ("neg_post", "unc_post") and t.start >= end:
            between = clause[end:t.start]
            if "," not in between and len(between.split()) <= _POST_WINDOW_WORDS \
                    and not any(end <= s.start and s.end <= t.start for s in stops):
                post.append(t)
    nearest_pre = max(pre, key=lambda t: t.end, default=None)
    nearest_post = min(post, key=lambda t: t.start, default=None)
    if nearest_post is not None and nearest_post.kind == "unc_post":
        return UNCERTAIN
    if nearest_pre is not None:
        return ABSENT if nearest_pre.kind == "neg_pre" else UNCERTAIN
    if nearest_post is not None:
        return ABSENT
    return PRESENT


def _combine(values: Iterable[int]) -> int:
    values = set(values)
    return PRESENT if PRESENT in values else UNCERTAIN if UNCERTAIN in values else ABSENT


class KeywordLabeller:
    """Pattern table + NegEx-style negation and uncertainty. Stateless after construction; thread-safe."""

    name = "keyword-labeller/1"

    def __init__(self, patterns_path: str | Path = DEFAULT_PATTERNS, labels: Iterable[str] = DIAGNOSIS_NAMES):
        self.patterns = load_patterns(patterns_path, labels)

    def sentence_values(self, sentence: str) -> dict[str, int]:
        """label -> value for one sentence (several mentions of a label in it are combined)."""
        found: dict[str, list[int]] = {}
        for clause in clauses(sentence):
            triggers = _triggers(clause)
            for label, patterns in self.patterns.items():
                spans = sorted({(m.start(), m.end()) for p in patterns for m in p.finditer(clause)})
                for start, end in spans:
                    found.setdefault(label, []).append(_state(clause, start, end, triggers))
        return {label: _combine(values) for label, values in found.items()}

    def label(self, text: str) -> list[Mention]:
        per_label: dict[str, list[tuple[int, str]]] = {}
        for sentence in sentences(text):
            for label, value in self.sentence_values(sentence).items():
                per_label.setdefault(label, []).append((value, sentence))
        mentions = []
        for label, values in per_label.items():
            value = _combine(v for v, _ in values)
            evidence = next(sentence for v, sentence in values if v == value)
            mentions.append(Mention(label, value, evidence))
        return sorted(mentions, key=lambda m: DIAGNOSIS_NAMES.index(m.label))


def default_labeller() -> ReportLabeller:
    return KeywordLabeller()
