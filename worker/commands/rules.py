"""``triage rules test FILE...``: which routing rule a study's files would match, and why.

The files are read as the receiver would see them (headers only) and grouped into studies; each study is routed
exactly as at completion (loop prevention, then the configured rules, then the fallback), as if received from the
AE title, address and transport given on the command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pacs_bridge.routing import expected_series_present, route
from pacs_bridge.rules import RuleError, RuleSet, StudyFacts
from pacs_bridge.study_facts import study_facts_from_files
from worker.config import load_settings


def register(subparsers) -> None:
    parser = subparsers.add_parser("rules", help="routing rules: test which rule files would match")
    sub = parser.add_subparsers(dest="rules_command", required=True)
    test = sub.add_parser("test", help="show the rule each study in FILE... matches, and why")
    test.add_argument("files", nargs="+", type=Path, help="DICOM files or folders (searched recursively)")
    test.add_argument("--calling-aet", help="as if sent by this AE title")
    test.add_argument("--called-aet", help="as if sent to this AE title")
    test.add_argument("--peer", help="as if sent from this IP address")
    test.add_argument("--source", default="c-store", choices=("c-store", "stow-rs", "c-get", "wado-rs"),
                      help="as if received this way (default: c-store)")
    test.add_argument("--all", action="store_true", help="also say why each rule before the match did not hold")
    test.set_defaults(func=_test)


def _test(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    try:
        rules = RuleSet.from_config(settings.routing.model_dump(),
                                    destinations=[d.get("name") for d in settings.destinations])
    except RuleError as exc:
        print(f"routing configuration error: {exc}", file=sys.stderr)
        return 2
    association = {"calling_aet": args.calling_aet, "called_aet": args.called_aet, "peer_address": args.peer,
                   "source": args.source}
    found, skipped = study_facts_from_files(args.files, rules.tag_names(), association)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not found:
        print("no DICOM studies in the files given", file=sys.stderr)
        return 1
    for study_uid, facts in found.items():
        print(describe(study_uid, facts, rules, show_all=args.all))
    return 0


def describe(study_uid: str, facts: StudyFacts, rules: RuleSet, show_all: bool = False) -> str:
    """What the rule tester prints for one study."""
    instances = sum(s.instance_count for s in facts.series)
    lines = [f"study {study_uid}: modalities {', '.join(sorted(facts.modalities)) or 'none'}; "
             f"{len(facts.series)} image series, {instances} image instances"]
    decision = route(facts, rules)
    lines.append(f"  rule {decision.rule!r} -> pipeline {decision.pipeline}, lane {decision.lane}")
    lines.append(f"    why: {decision.reason}")
    if decision.quiet_period_s is not None or decision.max_wait_s is not None:
        lines.append(f"    completion: quiet period {decision.quiet_period_s}s, maximum wait {decision.max_wait_s}s")
    expected = expected_series_present(decision, facts)
    if expected:
        shown = "; ".join(f"/{p}/ {'-> ' + repr(d) if d else 'missing'}" for p, d in expected.items())
        lines.append(f"    expected series: {shown}")
    for forward in decision.forward:
        lines.append(f"    forward: {forward.describe()}")
    if decision.rule != "loop-prevention":
        match = rules.match(facts)
        tried = [(rule, verdict) for rule, verdict in match.tried if not verdict.holds]
        if show_all and tried:
            lines.append("  rules before it that did not match:")
            lines.extend(f"    {rule.name!r}: {verdict.why}" for rule, verdict in tried)
    return "\n".join(lines)
