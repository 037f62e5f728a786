"""The SR test cases: one triage result of each kind for a brain MR study, and the SR files built for them."""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_bridge.results import Finding, ImageRegion, NotAnalysed, SimilarStudy, TriageResult
from pacs_bridge.sr import build_sr
from pacs_bridge.study_reference import study_reference
from tests.support.sr_checks import DEVICE_UID, SITE_KEY, mr_study

#: Prima's diagnosis names in class-index order (reference/prima.md §5).
PRIMA_LABELS = (
    "cyst_arachnoid_cyst", "cyst_colloid_cyst", "developmental_dandy_walker_malformation",
    "developmental_dysgenesis_corpus_callosum", "developmental_heterotopia", "infectious_brain_abscess",
    "infectious_viral_encephalitis", "inflammatory_multiple_sclerosis", "inflammatory_neurosarcoid",
    "sellar_craniopharyngioma", "sellar_pituitary_adenoma", "sellar_rathkes_cleft_cyst", "spine_syrinx",
    "structural_brain_herniation", "structural_cephaloceles", "structural_cerebral_atrophy",
    "structural_chiari_malformation", "structural_edema", "structural_encephalomalacia",
    "structural_mass_effect", "structural_midline_shift", "surgical_catheter", "surgical_craniotomy",
    "surgical_resection_cavity", "trauma_brain_contusion", "trauma_diffuse_axonal_injury",
    "trauma_subdural_hematoma", "tumor_adult_brain_metastasis", "tumor_adult_glioma",
    "tumor_adult_high_grade_glioma", "tumor_adult_low_grade_glioma", "tumor_adult_lymphoma",
    "tumor_adult_meningioma", "tumor_adult_pineal_tumor", "tumor_adult_schwannoma",
    "tumor_pediatric_brainstem_glioma", "tumor_pediatric_ependymoma", "tumor_pediatric_germ_cell_tumor",
    "tumor_pediatric_medulloblastoma", "tumor_pediatric_pilocytic_astrocytoma",
    "vascular_hemorrhagic_intracranial_hemorrhage", "vascular_hemorrhagic_intraventricular_hemorrhage",
    "vascular_hemorrhagic_subarachnoid_hemorrahage", "vascular_ischemic_lacunar_stroke",
    "vascular_ischemic_large_vessel_stroke", "vascular_ischemic_moyamoya",
    "vascular_ischemic_small_vessel_disease", "vascular_malformation_arteriovenous_malformation",
    "vascular_malformation_cavernoma", "vascular_malformation_cerebral_aneurysm",
    "ventricular_intracranial_hypotension", "ventricular_ventriculomegaly",
)


def square(column: float, row: float, size: float) -> tuple[tuple[float, float], ...]:
    """A closed 5-point polyline around a token patch, in pixel coordinates (column, row)."""
    right, bottom = column + size, row + size
    return ((column, row), (right, row), (right, bottom), (column, bottom), (column, row))


def region(image: pydicom.Dataset, column: float, row: float, weight: float) -> ImageRegion:
    return ImageRegion(image.SOPInstanceUID, image.SOPClassUID, image.SeriesInstanceUID,
                       square(column, row, 8.0), weight)


def subdural_haemorrhage(study: list[pydicom.Dataset]) -> TriageResult:
    return TriageResult(
        study_instance_uid=study[0].StudyInstanceUID,
        priority="stat",
        findings=(
            Finding("trauma_subdural_hematoma", 0.9731418204307556, 0.41,
                    regions=(region(study[40], 24.0, 8.0, 0.3125), region(study[41], 24.0, 8.5, 0.1171875),
                             region(study[190], 23.5, 8.0, -0.015625))),
            Finding("structural_mass_effect", 0.6120000123977661, 0.5),
            Finding("structural_midline_shift", 0.21, 0.55),
        ),
        referrals=("neurosurgery",),
        model_version="1.0.7+tiny",
        priority_scores={"none": 0.0123, "low": 0.0877, "high": 0.9},
        similar_studies=(
            # As read back: the SR names another patient's study by its pseudonymous reference only.
            SimilarStudy("", 0.9412345678901234, ("trauma_subdural_hematoma", "structural_mass_effect"),
                         reference=study_reference(SITE_KEY, generate_uid())),
            SimilarStudy("", 0.8875, ("trauma_subdural_hematoma",), reference=study_reference(SITE_KEY, generate_uid())),
        ),
    )


def tumour(study: list[pydicom.Dataset]) -> TriageResult:
    return TriageResult(
        study_instance_uid=study[0].StudyInstanceUID,
        priority="urgent",
        findings=(
            Finding("tumor_adult_high_grade_glioma", 0.8421, 0.35,
                    regions=(region(study[200], 12.0, 16.0, 0.5),)),
            Finding("structural_edema", 0.77, 0.5, regions=(region(study[60], 8.0, 16.0, 0.25),)),
            Finding("tumor_adult_brain_metastasis", 0.3, 0.45),
        ),
        referrals=("oncology", "neurosurgery"),
        model_version="1.0.7+tiny",
        priority_scores={"none": 0.05, "low": 0.7, "high": 0.25},
    )


def infarct(study: list[pydicom.Dataset]) -> TriageResult:
    return TriageResult(
        study_instance_uid=study[0].StudyInstanceUID,
        priority="stat",
        findings=(Finding("vascular_ischemic_large_vessel_stroke", 0.88, 0.3,
                          regions=(region(study[100], 40.0, 40.0, 1.0),)),),
        referrals=("stroke", "neurology"),
        model_version="1.0.7+tiny",
    )


def hydrocephalus(study: list[pydicom.Dataset]) -> TriageResult:
    return TriageResult(
        study_instance_uid=study[0].StudyInstanceUID,
        priority="urgent",
        findings=(Finding("ventricular_ventriculomegaly", 0.66, 0.5),
                  Finding("structural_cerebral_atrophy", 0.4, 0.5),
                  Finding("trauma_subdural_hematoma", 0.02, 0.41, reported_absent=True)),
        model_version="1.0.7+tiny",
    )


def normal_top_k(study: list[pydicom.Dataset]) -> TriageResult:
    """A normal study: nothing above its threshold, the top 3 of the differential reported all the same."""
    return TriageResult(
        study_instance_uid=study[0].StudyInstanceUID,
        priority="routine",
        findings=(Finding("structural_cerebral_atrophy", 0.12, 0.5), Finding("cyst_colloid_cyst", 0.031, 0.6),
                  Finding("inflammatory_multiple_sclerosis", 0.02, 0.5)),
        model_version="1.0.7+tiny",
        priority_scores={"none": 0.97, "low": 0.02, "high": 0.01},
    )


def no_finding(study: list[pydicom.Dataset]) -> TriageResult:
    """A result that reports no diagnosis at all (e.g. from a bundle that reports positives only)."""
    return TriageResult(study_instance_uid=study[0].StudyInstanceUID, priority="routine", findings=(),
                        model_version="1.0.7+tiny")


def not_analysed(study: list[pydicom.Dataset]) -> NotAnalysed:
    """A study the input gate turned away."""
    return NotAnalysed(study[0].StudyInstanceUID, "neuro_mri",
                       ("required series /(?i)adc/ is missing (series present: 'AX T2 FLAIR', 'AX T1 POST')",
                        "no series is adequate for neuro_mri: the best, series 'AX T2 FLAIR', has 1 slice (minimum "
                        "12)"), model_name="prima", model_version="1.0.7+tiny")


CASES = {make.__name__: make
         for make in (subdural_haemorrhage, tumour, infarct, hydrocephalus, normal_top_k, no_finding, not_analysed)}


@pytest.fixture(scope="module")
def study() -> list[pydicom.Dataset]:
    return mr_study()


@pytest.fixture(scope="module")
def written(study, tmp_path_factory) -> dict[str, tuple[TriageResult, Path]]:
    """Each case's result and the file of the SR built for it."""
    folder = tmp_path_factory.mktemp("sr")
    out = {}
    for name, make in CASES.items():
        result = make(study)
        path = folder / f"{name}.dcm"
        sr = build_sr(result, study, device_uid=DEVICE_UID, institution_name="General Hospital")
        sr.save_as(path, enforce_file_format=True)
        out[name] = (result, path)
    return out
