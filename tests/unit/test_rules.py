"""Routing rules on real tags: the phantom brain MR, pydicom's chest CR and CT, and our own SR.

The rules are evaluated where they are used: by ``triage rules test`` on files, and by the study assembler on what
the SCP received (the routing event names the rule and why). Loop prevention applies whatever the rules say.
"""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage
from sqlalchemy import func, select, update

from pacs_bridge.routing import route
from pacs_bridge.rules import RuleError, RuleSet, SeriesFacts, StudyFacts, result_facts
from pacs_bridge.schema import deliveries, events, instances, processing_runs, studies
from tests.support.intake import our_sr, phantom, receiver_for, write_config
from worker.cli import main

#: A site's rules: brain MR to the study encoder, urgent; chest radiographs to the slice pipeline; CT not yet, but
#: archived for research; anything else from the research scanner forwarded too. The catch-all at the end would
#: match an SR if loop prevention let it.
RULES = [
    {"name": "brain-mr", "pipeline": "neuro_mri", "lane": "urgent",
     "match": {"all": [{"tag": "Modality", "equals": "MR"},
                       {"tag": "BodyPartExamined", "regex": "(?i)^(brain|head)$"}]},
     "expected_series": ["(?i)flair", "(?i)dwi"]},
    {"name": "chest-radiograph", "pipeline": "slice_knn",
     "match": {"all": [{"tag": "Modality", "equals": ["CR", "DX"]},
                       {"any": [{"tag": "BodyPartExamined", "equals": "CHEST"},
                                {"tag": "StudyDescription", "regex": "(?i)thorax|chest"}]}]}},
    {"name": "ct-not-yet", "pipeline": "ignore",
     "match": {"all": [{"tag": "Modality", "equals": "CT"}, {"tag": "SliceThickness", "range": [0.5, 10]}]},
     "forward": [{"to": ["research"], "stage": "before"}]},
    {"name": "anything-with-a-manufacturer", "pipeline": "slice_knn",
     "match": {"tag": "Manufacturer", "present": True}, "forward": [{"to": ["research"]}]},
]
DESTINATIONS = [{"name": "research", "kind": "dicom", "host": "127.0.0.1", "port": 1, "ae_title": "NOWHERE",
                 "results": False}]


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


def _test_files() -> dict[str, Path]:
    cr = get_testdata_file("RG1_UNCR.dcm", download=False)
    if cr is None:
        pytest.skip("pydicom-data (chest CR RG1_UNCR.dcm) is not installed")
    return {"ct": Path(get_testdata_file("CT_small.dcm", download=False)), "cr": Path(cr)}


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


@pytest.fixture
def receiver(tmp_path):
    r = receiver_for(tmp_path, routing={"rules": RULES}, destinations=DESTINATIONS,
                     assembly={"quiet_period_s": 30, "expected_series_settle_s": 0.5}).start()
    yield r
    r.stop()


def _routing_events(receiver) -> dict[str, dict]:
    with receiver.engine.connect() as c:
        rows = c.execute(select(events.c.study_instance_uid, events.c.reason, events.c.detail)
                         .where(events.c.kind == "routing")).all()
    return {r.study_instance_uid: {"reason": r.reason, **r.detail} for r in rows}


def test_received_studies_are_routed_by_the_rule_that_matches_and_the_event_says_why(receiver, tmp_path):
    mr = phantom("normal", 5, ("AX T2 FLAIR", "AX DWI"))
    files = _test_files()
    receiver.send(mr.folder)
    receiver.send(files["ct"], files["cr"], aet="RADIOLOGY")
    receiver.complete()

    routed = _routing_events(receiver)
    ct_uid = str(pydicom.dcmread(files["ct"], stop_before_pixels=True).StudyInstanceUID)
    cr_uid = str(pydicom.dcmread(files["cr"], stop_before_pixels=True).StudyInstanceUID)
    assert routed[mr.study_instance_uid]["rule"] == "brain-mr"
    assert routed[mr.study_instance_uid]["lane"] == "urgent"
    assert "BodyPartExamined 'BRAIN'" in routed[mr.study_instance_uid]["reason"]
    assert routed[cr_uid]["rule"] == "chest-radiograph" and routed[cr_uid]["pipeline"] == "slice_knn"
    assert routed[ct_uid]["rule"] == "ct-not-yet"
    with receiver.engine.connect() as c:
        runs = {r.pipeline: r for r in c.execute(select(processing_runs)).all()}
        status = dict(c.execute(select(studies.c.study_instance_uid, studies.c.status)).all())
        forwards = c.execute(select(deliveries)).all()
    assert set(runs) == {"neuro_mri", "slice_knn"} and runs["neuro_mri"].lane == "urgent"
    assert runs["neuro_mri"].routing["rule"] == "brain-mr"
    assert status[ct_uid] == "ignored"
    assert sorted(receiver.dispatched, key=lambda d: d[1]) == [
        (runs["neuro_mri"].id, "neuro_mri", "urgent"), (runs["slice_knn"].id, "slice_knn", "routine")]
    # The CT is not processed but is forwarded on routing, its image as received.
    [forward] = forwards
    assert (forward.kind, forward.stage, forward.destination) == ("images", "before", "research")
    with receiver.engine.connect() as c:
        stored = c.execute(select(instances.c.path).where(instances.c.sop_class_uid == CTImageStorage)).scalars().all()
    assert forward.files == stored
    assert pydicom.dcmread(forward.files[0]).PixelData == pydicom.dcmread(files["ct"]).PixelData
    assert receiver.forwarded == [forward.id]


def test_our_own_sr_never_triggers_processing_nor_forwarding(receiver, tmp_path):
    mr = phantom("normal", 5, ("AX T2 FLAIR", "AX DWI"))
    receiver.send(mr.folder)
    receiver.complete()
    with receiver.engine.begin() as c:  # processed: the worker has written and delivered its SR
        c.execute(update(studies).values(status="done"))
        c.execute(update(processing_runs).values(status="done"))
    sr = our_sr(list(mr.files), tmp_path / "sr")
    receiver.send(sr, aet="PACS")  # the PACS routes our SR back to us
    alone = our_sr(list(phantom("tumour", 6, ("AX T2 FLAIR",)).files), tmp_path / "alone")
    receiver.send(alone, aet="PACS")  # an SR of a study we never received (the catch-all rule would match it)
    receiver.complete(after_s=7200)

    with receiver.engine.connect() as c:
        study = c.execute(select(studies).where(studies.c.study_instance_uid == mr.study_instance_uid)).one()
        other = c.execute(select(studies).where(studies.c.study_instance_uid != mr.study_instance_uid)).one()
        n_runs = c.execute(select(func.count()).select_from(processing_runs)).scalar_one()
        n_deliveries = c.execute(select(func.count()).select_from(deliveries)).scalar_one()
    assert (study.status, study.version) == ("done", 1)  # not re-opened by the SR
    assert study.instance_count == len(mr.files) + 1  # the SR is kept
    assert other.status == "ignored" and other.pipeline == "ignore"
    assert _routing_events(receiver)[other.study_instance_uid]["rule"] == "loop-prevention"
    assert n_runs == 1 and n_deliveries == 0 and len(receiver.dispatched) == 1


def test_expected_series_complete_a_study_before_its_quiet_period(receiver):
    complete = phantom("normal", 5, ("AX T2 FLAIR", "AX DWI"))
    partial = phantom("infarct", 7, ("AX T2 FLAIR",))  # no DWI yet
    receiver.send(complete.folder)
    receiver.send(partial.folder)
    receiver.complete(after_s=2)  # far inside the 30 s quiet period

    with receiver.engine.connect() as c:
        status = dict(c.execute(select(studies.c.study_instance_uid, studies.c.status)).all())
        reason = c.execute(select(events.c.reason).where(events.c.kind == "completion")).scalar_one()
    assert status == {complete.study_instance_uid: "queued", partial.study_instance_uid: "receiving"}
    assert "all expected series of rule 'brain-mr' present" in reason
    receiver.complete(after_s=31)
    with receiver.engine.connect() as c:
        assert c.execute(select(studies.c.status).where(
            studies.c.study_instance_uid == partial.study_instance_uid)).scalar_one() == "queued"


@pytest.mark.parametrize("engine", ["pynetdicom", "dcmtk"])
def test_a_rule_on_the_calling_ae_title_sets_the_studys_own_quiet_period(tmp_path, engine):
    rules = [{"name": "from-research", "pipeline": "neuro_mri", "quiet_period_s": 120,
              "match": {"all": [{"tag": "calling_aet", "equals": "RESEARCH"},
                                {"tag": "called_aet", "regex": "^TRIAGE"}]}},
             *RULES]
    receiver = receiver_for(tmp_path, routing={"rules": rules}, destinations=DESTINATIONS,
                            assembly={"quiet_period_s": 10}, scp={"engine": engine}).start()
    try:
        mr = phantom("normal", 5, ("AX T2 FLAIR", "AX DWI"))
        receiver.send(mr.folder, aet="RESEARCH", called="TRIAGE_NEURO")
        receiver.complete(after_s=60)  # past the default 10 s, inside the rule's 120 s
        with receiver.engine.connect() as c:
            assert c.execute(select(studies.c.status)).scalar_one() == "receiving"
        receiver.complete(after_s=121)
        routed = _routing_events(receiver)[mr.study_instance_uid]
        assert routed["rule"] == "from-research"
        assert "calling_aet 'RESEARCH' equals 'RESEARCH'" in routed["reason"]
        assert "called_aet 'TRIAGE_NEURO' matches" in routed["reason"]
    finally:
        receiver.stop()
