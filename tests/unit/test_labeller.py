"""Report labeller: the 52 labels from report text, with negation, uncertainty and the committed accuracy set."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models.labeller import ABSENT, PRESENT, UNCERTAIN, KeywordLabeller, ReportLabeller, load_patterns
from models.labels import DIAGNOSIS_NAMES
from train.labeller_eval import evaluate, load_sentences


@pytest.fixture(scope="module")
def labeller() -> KeywordLabeller:
    return KeywordLabeller()


def values(labeller: ReportLabeller, text: str) -> dict[str, int]:
    return {m.label: m.value for m in labeller.label(text)}


def test_every_diagnosis_label_has_patterns(labeller):
    assert set(labeller.patterns) == set(DIAGNOSIS_NAMES)


def test_asserted_negated_and_hedged_findings(labeller):
    assert values(labeller, "Acute left subdural hematoma measuring 9 mm.") == {"trauma_subdural_hematoma": PRESENT}
    assert values(labeller, "No subdural hematoma.") == {"trauma_subdural_hematoma": ABSENT}
    assert values(labeller, "A small subdural hematoma cannot be excluded.") == {"trauma_subdural_hematoma": UNCERTAIN}
    assert values(labeller, "Possible small subdural hematoma.") == {"trauma_subdural_hematoma": UNCERTAIN}
    assert values(labeller, "The subdural hematoma has resolved.") == {"trauma_subdural_hematoma": ABSENT}


def test_negation_covers_a_list_but_stops_at_but(labeller):
    found = values(labeller, "No hemorrhage, midline shift or hydrocephalus but there is a large meningioma.")
    assert found == {"vascular_hemorrhagic_intracranial_hemorrhage": ABSENT, "structural_midline_shift": ABSENT,
                     "ventricular_ventriculomegaly": ABSENT, "tumor_adult_meningioma": PRESENT}


def test_without_negates_only_what_follows_it(labeller):
    found = values(labeller, "Calcified meningioma without surrounding edema.")
    assert found == {"tumor_adult_meningioma": PRESENT, "structural_edema": ABSENT}


def test_no_interval_change_is_not_a_negation(labeller):
    assert values(labeller, "No interval change in the left frontal meningioma.") == {"tumor_adult_meningioma": PRESENT}


def test_a_differential_hedges_each_side(labeller):
    found = values(labeller, "Cerebellopontine angle mass: meningioma versus schwannoma.")
    assert found == {"tumor_adult_meningioma": UNCERTAIN, "tumor_adult_schwannoma": UNCERTAIN}


def test_present_anywhere_in_the_report_wins(labeller):
    report = "Findings: Possible small contusion. There is a right frontal contusion.\nImpression: contusion."
    assert values(labeller, report) == {"trauma_brain_contusion": PRESENT}


def test_indication_and_history_are_not_findings(labeller):
    report = ("Clinical history: known glioblastoma.\nIndication: rule out hemorrhage.\n"
              "Findings: No acute intracranial hemorrhage. Stable resection cavity.")
    assert values(labeller, report) == {"vascular_hemorrhagic_intracranial_hemorrhage": ABSENT,
                                        "surgical_resection_cavity": PRESENT}


def test_specific_subtypes_do_not_leak_into_their_neighbours(labeller):
    assert values(labeller, "Typical pilocytic astrocytoma.") == {"tumor_pediatric_pilocytic_astrocytoma": PRESENT}
    assert values(labeller, "Diffuse intrinsic pontine glioma.") == {"tumor_pediatric_brainstem_glioma": PRESENT}
    assert values(labeller, "Chronic lacunar infarct.") == {"vascular_ischemic_lacunar_stroke": PRESENT}
    assert values(labeller, "Acute subarachnoid hemorrhage.") == {
        "vascular_hemorrhagic_subarachnoid_hemorrahage": PRESENT}


def test_each_mention_carries_its_sentence_as_evidence(labeller):
    mention, = labeller.label("Normal ventricles. Small colloid cyst at the foramen of Monro.")
    assert mention.label == "cyst_colloid_cyst" and mention.evidence == "Small colloid cyst at the foramen of Monro."


def test_a_pattern_table_naming_an_unknown_label_is_refused(tmp_path):
    table = tmp_path / "patterns.csv"
    table.write_text("label,pattern\ntumor_adult_meningioma,meningioma\nbrain_tumour,tumou?r\n")
    with pytest.raises(ValueError, match="line 3: 'brain_tumour' is not one of the 52"):
        load_patterns(table)


def test_committed_sentence_set_covers_negation_uncertainty_and_every_label():
    rows = load_sentences()
    assert len(rows) >= 200
    all_values = [value for row in rows for value in row.labels.values()]
    assert all_values.count(ABSENT) >= 50 and all_values.count(UNCERTAIN) >= 50
    assert {label for row in rows for label, value in row.labels.items() if value == PRESENT} == set(DIAGNOSIS_NAMES)


def test_labeller_macro_f1_on_the_committed_sentences_is_at_least_0_9(labeller):
    assert evaluate(labeller, load_sentences())["macro_f1"] >= 0.9


def test_bench_labeller_command_prints_macro_f1_last():
    result = subprocess.run([sys.executable, "-m", "worker.cli", "bench", "labeller"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "labeller" and figures["sentences"] >= 200
    assert figures["macro_f1"] >= 0.9
