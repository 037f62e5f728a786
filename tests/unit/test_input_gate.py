"""The input adequacy gate: a study that does not give the model what it needs is "not analysed", with its reasons,
before the model runs; no priority is raised and nothing is forwarded on an AI result.

The end-to-end cases use the real service parts (storescu -> our SCP -> bookkeeping -> completion and routing on
SQLite and PostgreSQL -> the worker's neuro_mri pipeline -> SR, deliveries, publications, forwards); the model is the
planted-lesion reader of test_forwarding (a perfect reader of the phantom), so a complete bleed is "stat".
"""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support.input_gate import EXPECTED, FULL
from tests.support.intake import phantom
from worker.config import Settings
from worker.input_gate import GateConfigError, GatePolicy, SeriesInput, assess


def neuro_policy(**changes) -> GatePolicy:
    return GatePolicy.from_config("neuro_mri", {**Settings().input_gate.neuro_mri.model_dump(), **changes})


def series(description: str, slices: int = 24, spacing: float = 6.0, modality: str = "MR",
           body_part: str = "BRAIN") -> SeriesInput:
    return SeriesInput(generate_uid(), description, modality, body_part, slices, slices * spacing)


# -- the gate's decisions --------------------------------------------------------------------------------------
def test_a_complete_brain_mr_passes():
    import re

    verdict = assess([series(d) for d in FULL], neuro_policy(), [re.compile(p) for p in EXPECTED])
    assert verdict.adequate and verdict.reasons == ()


def test_one_slice_is_not_enough_and_the_reason_says_how_many_are_needed():
    verdict = assess([series("AX DWI ADC", slices=1)], neuro_policy())
    assert not verdict.adequate and verdict.checks == ("slices",)
    assert "has 1 slice (minimum 12) and 6 mm coverage (minimum 80 mm)" in verdict.reasons[0]


def test_a_missing_required_sequence_is_named():
    import re

    verdict = assess([series("AX T2 FLAIR"), series("AX DWI")], neuro_policy(), [re.compile(p) for p in EXPECTED])
    assert verdict.reasons == ("required series /(?i)adc/ is missing (series present: 'AX T2 FLAIR', 'AX DWI')",)


def test_the_gates_own_required_series_replace_the_rules():
    verdict = assess([series("AX T2 FLAIR")], neuro_policy(required_series=["(?i)swi"]), [])
    assert verdict.checks == ("required_series",)


def test_a_non_brain_mr_and_a_ct_are_not_for_the_brain_model():
    spine = assess([series("SAG T2", body_part="LSPINE")], neuro_policy())
    assert spine.checks == ("body_part",) and "'LSPINE' is not one neuro_mri analyses" in spine.reasons[0]
    ct = assess([series("HEAD 5mm", modality="CT", body_part="HEAD")], neuro_policy())
    assert ct.checks == ("modality",) and "no MR series for neuro_mri (modalities present: CT)" in ct.reasons[0]


def test_a_series_without_body_part_counts_unless_configured_otherwise():
    assert assess([series("AX T2 FLAIR", body_part="")], neuro_policy()).adequate
    assert not assess([series("AX T2 FLAIR", body_part="")], neuro_policy(accept_missing_body_part=False)).adequate


def test_a_bad_gate_configuration_names_the_key():
    with pytest.raises(GateConfigError, match="input_gate.neuro_mri.body_part_regex"):
        neuro_policy(body_part_regex="(unclosed")
    with pytest.raises(GateConfigError, match="unknown keys"):
        neuro_policy(min_slice=3)


def test_slices_and_coverage_come_from_the_headers_geometry():
    from worker.input_gate import read_headers, series_inputs

    study = phantom("normal", 41, ("AX DWI",))  # b0 and b1000 at the same 24 positions, 6 mm apart, 5 mm thick
    by_series: dict[str, list[Path]] = {}
    for path in study.files:
        by_series.setdefault(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID, []).append(path)
    [facts] = series_inputs(read_headers(by_series))
    assert (facts.modality, facts.body_part, facts.slices) == ("MR", "BRAIN", 24)
    assert facts.coverage_mm == pytest.approx(23 * 6.0 + 5.0)


