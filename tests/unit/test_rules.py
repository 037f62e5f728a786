"""Routing rules on real tags: the phantom brain MR, pydicom's chest CR and CT, and our own SR.

The rules are evaluated where they are used: by ``triage rules test`` on files, and by the study assembler on what
the SCP received (the routing event names the rule and why). Loop prevention applies whatever the rules say.
"""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from pacs_bridge.routing import route
from pacs_bridge.rules import RuleError, RuleSet, SeriesFacts, StudyFacts, result_facts
from tests.support.intake import our_sr, phantom, write_config
from tests.support.routing import DESTINATIONS, RULES, _test_files
from worker.cli import main


def _ruleset() -> RuleSet:
    return RuleSet.from_config({"rules": RULES}, destinations=["research"])


def _study(**attributes) -> StudyFacts:
    values = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in attributes.items()}
    return StudyFacts("1.2.3", (SeriesFacts("1.2.3.4", values, 1),), frozenset({values["Modality"][0]}))


def test_conditions_combine_equality_regex_ranges_and_negation():
    rules = RuleSet.from_config({"rules": [
        {"name": "adult-head-ct-not-from-research", "pipeline": "slice_knn", "match": {"all": [
            {"tag": "Modality", "equals": "CT"},
            {"tag": "StudyDescription", "regex": "(?i)head|brain"},
            {"tag": "PatientAge", "range": [18, None]},
            {"not": {"tag": "calling_aet", "equals": ["RESEARCH", "PHANTOM"]}},
        ]}},
    ]})
    adult = _study(Modality="CT", StudyDescription="CT HEAD W/O", PatientAge="054Y", calling_aet="CT1")
    child = _study(Modality="CT", StudyDescription="CT HEAD W/O", PatientAge="009Y", calling_aet="CT1")
    research = _study(Modality="CT", StudyDescription="CT Brain", PatientAge="054Y", calling_aet="RESEARCH")

    decision = route(adult, rules)
    assert decision.rule == "adult-head-ct-not-from-research" and decision.pipeline == "slice_knn"
    assert "PatientAge '054Y' >= 18" in decision.reason
    assert "no calling_aet is one of 'PHANTOM', 'RESEARCH'" in decision.reason
    assert route(child, rules).rule == "fallback"
    assert "PatientAge" in rules.match(child).tried[0][1].why
    assert "excluded because calling_aet 'RESEARCH'" in rules.match(research).tried[0][1].why


def test_a_test_holds_when_any_series_passes_and_not_means_none_does():
    facts = StudyFacts("1.2.3", (
        SeriesFacts("1.1", {"Modality": ("MR",), "SeriesDescription": ("AX FLAIR",)}),
        SeriesFacts("1.2", {"Modality": ("MR",), "SeriesDescription": ("SAG T1",), "ImageType": ("DERIVED",
                                                                                                 "SECONDARY")}),
    ), frozenset({"MR"}))
    rules = RuleSet.from_config({"rules": [
        {"name": "has-derived", "pipeline": "ignore", "match": {"tag": "ImageType", "equals": "DERIVED"}},
    ]})
    assert route(facts, rules).rule == "has-derived"
    rules = RuleSet.from_config({"rules": [
        {"name": "no-derived", "pipeline": "neuro_mri", "match": {"not": {"tag": "ImageType", "equals": "DERIVED"}}},
    ]})
    assert route(facts, rules).rule == "fallback"


def test_result_conditions_see_priority_findings_and_probabilities():
    from pacs_bridge.results import Finding, TriageResult
    from pacs_bridge.rules import compile_condition

    result = TriageResult("1.2.3", "stat", (Finding("trauma_subdural_hematoma", 0.8, 0.5),
                                            Finding("structural_edema", 0.3, 0.5)))
    facts = result_facts(result, {"tumor_glioma": 0.02})
    assert compile_condition({"result": "priority", "equals": "stat"}, ("result",)).evaluate(facts).holds
    no_finding = compile_condition({"not": {"result": "findings", "present": True}}, ("result",))
    assert not no_finding.evaluate(facts).holds  # the haematoma is above its threshold
    assert compile_condition({"result": "probability:tumor_glioma", "range": [None, 0.1]},
                             ("result",)).evaluate(facts).holds


@pytest.mark.parametrize("routing, message", [
    ({"rules": [{"name": "x", "pipeline": "neuro_mri", "match": {"tag": "Modalty", "equals": "MR"}}]},
     "'Modalty' is not a DICOM keyword"),
    ({"rules": [{"name": "x", "pipeline": "neuro_mri", "match": {"tag": "SeriesDescription", "regex": "(flair"}}]},
     "does not compile"),
    ({"rules": [{"name": "x", "pipeline": "brain", "match": {"tag": "Modality", "equals": "MR"}}]},
     "pipeline must be one of"),
    ({"rules": [{"name": "x", "pipeline": "neuro_mri", "match": {"result": "priority", "equals": "stat"}}]},
     "not allowed here"),
    ({"rules": [{"name": "x", "pipeline": "neuro_mri", "match": {"tag": "Modality", "equals": "MR"},
                 "forward": [{"to": "oncall", "stage": "after", "if": {"result": "priority", "equals": "stat"}}]}]},
     "'oncall'] are not configured"),
    ({"rules": [{"name": "x", "pipeline": "ignore", "match": {"tag": "Modality", "equals": "MR"},
                 "forward": [{"to": "research", "stage": "after"}]}]},
     "need a pipeline"),
    ({"rules": [{"name": "x", "pipeline": "neuro_mri", "match": {"tag": "Modality", "equals": "MR"}}],
      "fallback": {"match": {"tag": "Modality", "equals": "CT"}}},
     "the fallback has no match"),
])
def test_bad_routing_configuration_is_refused_naming_the_rule(routing, message):
    with pytest.raises(RuleError, match=message) as raised:
        RuleSet.from_config(routing, destinations=["research"])
    assert "routing." in str(raised.value)


def test_rules_test_command_prints_the_matching_rule_for_mr_cr_ct_and_sr(tmp_path, capsys):
    mr = phantom("normal", 5, ("AX T2 FLAIR", "AX DWI"))
    files = _test_files()
    sr = our_sr(list(mr.files[:3]), tmp_path / "sr")
    config = write_config(tmp_path, routing={"rules": RULES}, destinations=DESTINATIONS)

    def rules_test(*paths: Path) -> str:
        capsys.readouterr()
        assert main(["--config", str(config), "rules", "test", "--all", *map(str, paths)]) == 0
        return capsys.readouterr().out

    out = rules_test(mr.folder, files["cr"], files["ct"])
    blocks = {block.split(":")[0].split()[-1]: block for block in out.split("study ")[1:]}
    ct_uid = str(pydicom.dcmread(files["ct"], stop_before_pixels=True).StudyInstanceUID)
    cr_uid = str(pydicom.dcmread(files["cr"], stop_before_pixels=True).StudyInstanceUID)
    assert "rule 'brain-mr' -> pipeline neuro_mri, lane urgent" in blocks[mr.study_instance_uid]
    assert "BodyPartExamined 'BRAIN' matches" in blocks[mr.study_instance_uid]
    assert "/(?i)dwi/ -> 'AX DWI'" in blocks[mr.study_instance_uid]
    assert "rule 'chest-radiograph' -> pipeline slice_knn" in blocks[cr_uid]
    assert "BodyPartExamined 'CHEST' equals 'CHEST'" in blocks[cr_uid]
    assert "rule 'ct-not-yet' -> pipeline ignore" in blocks[ct_uid]
    assert "SliceThickness '5.000000' in range [0.5, 10]" in blocks[ct_uid]
    assert "forward: before processing -> research" in blocks[ct_uid]
    assert "'brain-mr': no Modality equals 'MR' (values: 'CT')" in blocks[ct_uid]

    sr_out = rules_test(sr)  # our own SR, alone: the catch-all rule would take it, loop prevention does not let it
    assert "rule 'loop-prevention' -> pipeline ignore" in sr_out
    assert "forward:" not in sr_out


