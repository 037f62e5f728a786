"""Label tables of the Prima family: diagnosis names, priority classes and our default referral list.

The diagnosis names are in the class-index order of the published heads (Prima
``config-classification-head-train.yaml``, see ``reference/prima.md`` §5); the spelling, including
``subarachnoid_hemorrahage``, is the checkpoint's and must not be "fixed", because the heads are keyed by it.
"""

from __future__ import annotations

DIAGNOSIS_NAMES: tuple[str, ...] = (
    "cyst_arachnoid_cyst",
    "cyst_colloid_cyst",
    "developmental_dandy_walker_malformation",
    "developmental_dysgenesis_corpus_callosum",
    "developmental_heterotopia",
    "infectious_brain_abscess",
    "infectious_viral_encephalitis",
    "inflammatory_multiple_sclerosis",
    "inflammatory_neurosarcoid",
    "sellar_craniopharyngioma",
    "sellar_pituitary_adenoma",
    "sellar_rathkes_cleft_cyst",
    "spine_syrinx",
    "structural_brain_herniation",
    "structural_cephaloceles",
    "structural_cerebral_atrophy",
    "structural_chiari_malformation",
    "structural_edema",
    "structural_encephalomalacia",
    "structural_mass_effect",
    "structural_midline_shift",
    "surgical_catheter",
    "surgical_craniotomy",
    "surgical_resection_cavity",
    "trauma_brain_contusion",
    "trauma_diffuse_axonal_injury",
    "trauma_subdural_hematoma",
    "tumor_adult_brain_metastasis",
    "tumor_adult_glioma",
    "tumor_adult_high_grade_glioma",
    "tumor_adult_low_grade_glioma",
    "tumor_adult_lymphoma",
    "tumor_adult_meningioma",
    "tumor_adult_pineal_tumor",
    "tumor_adult_schwannoma",
    "tumor_pediatric_brainstem_glioma",
    "tumor_pediatric_ependymoma",
    "tumor_pediatric_germ_cell_tumor",
    "tumor_pediatric_medulloblastoma",
    "tumor_pediatric_pilocytic_astrocytoma",
    "vascular_hemorrhagic_intracranial_hemorrhage",
    "vascular_hemorrhagic_intraventricular_hemorrhage",
    "vascular_hemorrhagic_subarachnoid_hemorrahage",
    "vascular_ischemic_lacunar_stroke",
    "vascular_ischemic_large_vessel_stroke",
    "vascular_ischemic_moyamoya",
    "vascular_ischemic_small_vessel_disease",
    "vascular_malformation_arteriovenous_malformation",
    "vascular_malformation_cavernoma",
    "vascular_malformation_cerebral_aneurysm",
    "ventricular_intracranial_hypotension",
    "ventricular_ventriculomegaly",
)

#: Priority classes of the current Prima priority head, lowest first (3 classes since Prima commit 1eeb318;
#: older checkpoints had a fourth, "medium", between "low" and "high").
PRIORITY_CLASSES: tuple[str, ...] = ("none", "low", "high")
LEGACY_PRIORITY_CLASSES: tuple[str, ...] = ("none", "low", "medium", "high")

#: Referral targets of our own bundles. The published referral names are not in the Prima repository; a bundle
#: exported from the official checkpoint lists its own in its manifest, which then takes precedence.
REFERRALS: tuple[str, ...] = ("neurosurgery", "neurology", "stroke", "oncology")

assert len(DIAGNOSIS_NAMES) == 52 and len(set(DIAGNOSIS_NAMES)) == 52
