"""Tissue parameters and MR signal equations: tissue fractions -> image intensity (data.md §5, "Tissue
parameters" and "Signal").

A voxel's signal is the fraction-weighted sum of its tissues' signals. The healthy image of each contrast is
computed once per grid and cached; a study adds its lesion's difference inside the lesion's box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from train.phantoms.anatomy import BRAIN_CLASSES, HEAD_CLASSES, Anatomy, fraction_sum, load_anatomy
from train.phantoms.lesions import PlantedLesion


@dataclass(frozen=True)
class TissueParameters:
    """Proton density (relative), relaxation times (ms), apparent diffusion coefficient (10⁻³ mm²/s), and
    whether the tissue is fat (which fat saturation suppresses)."""

    pd: float
    t1_ms: float
    t2_ms: float
    adc: float
    fat: bool = False


TISSUES: dict[str, TissueParameters] = {
    "wm": TissueParameters(0.70, 800, 80, 0.7),
    "gm": TissueParameters(0.80, 1300, 100, 0.8),
    "csf": TissueParameters(1.00, 4000, 2000, 3.0),
    "skull": TissueParameters(0.05, 500, 10, 0.1),
    "scalp": TissueParameters(0.90, 350, 70, 0.2, fat=True),  # subcutaneous fat dominates the scalp
    "tumour_core": TissueParameters(0.90, 1700, 140, 1.1),
    "oedema": TissueParameters(0.92, 1500, 180, 1.4),  # vasogenic: free water, high ADC
    "subdural_blood": TissueParameters(0.85, 600, 300, 0.8),  # subacute: methaemoglobin shortens T1
    "infarct": TissueParameters(0.85, 1400, 130, 0.35),  # acute: cytotoxic oedema restricts diffusion
}

_ADC_MASK_FRACTION = 0.05  # no ADC where there is almost no tissue (air), as scanners mask the noise floor
_FAT_RESIDUAL = 0.1  # fat signal left after fat saturation


@dataclass(frozen=True)
class Contrast:
    """A pulse sequence's view of tissue: spin echo, inversion recovery, or the ADC map.

    Spin echo: S = PD(1 - e^(-TR/T1))e^(-TE/T2)·e^(-b·ADC); inversion recovery (magnitude):
    S = PD|1 - 2e^(-TI/T1) + e^(-TR/T1)|e^(-TE/T2). Fat saturation (the diffusion series, not in the recipe)
    leaves a tenth of the fat signal. With ``brain_from_template`` (the T1 MPRAGE) the brain's
    classes show the template's own T1 intensity, which has far more anatomical detail than three classes, and
    other tissues use the equation scaled to match it.
    """

    name: str
    kind: Literal["spin_echo", "inversion_recovery", "adc"]
    tr_ms: float = 0.0
    te_ms: float = 0.0
    ti_ms: float = 0.0
    b_value: float = 0.0
    brain_from_template: bool = False
    diffusion: bool = False  # an image of a diffusion series (b0 included): carries DiffusionBValue
    fat_suppressed: bool = False

    def tissue_signal(self, tissue: TissueParameters) -> float:
        if self.kind == "adc":
            return tissue.adc
        if self.fat_suppressed and tissue.fat:
            # EPI diffusion always saturates fat: its chemical shift would otherwise ghost across the brain.
            return _FAT_RESIDUAL * self._unsuppressed(tissue)
        return self._unsuppressed(tissue)

    def _unsuppressed(self, tissue: TissueParameters) -> float:
        t2_decay = math.exp(-self.te_ms / tissue.t2_ms)
        if self.kind == "spin_echo":
            recovery = 1.0 - math.exp(-self.tr_ms / tissue.t1_ms)
            diffusion = math.exp(-self.b_value * tissue.adc * 1e-3)
            return tissue.pd * recovery * t2_decay * diffusion
        inversion = 2.0 * math.exp(-self.ti_ms / tissue.t1_ms)
        recovery = abs(1.0 - inversion + math.exp(-self.tr_ms / tissue.t1_ms))
        return tissue.pd * recovery * t2_decay


CONTRASTS: dict[str, Contrast] = {
    c.name: c
    for c in (
        Contrast("T1", "inversion_recovery", tr_ms=2300, te_ms=2.3, ti_ms=900, brain_from_template=True),
        Contrast("T2", "spin_echo", tr_ms=5000, te_ms=100),
        Contrast("FLAIR", "inversion_recovery", tr_ms=9000, te_ms=120, ti_ms=2500),  # TI nulls CSF
        Contrast("DWI_B0", "spin_echo", tr_ms=5000, te_ms=80, diffusion=True, fat_suppressed=True),
        Contrast("DWI_B1000", "spin_echo", tr_ms=5000, te_ms=80, b_value=1000, diffusion=True,
                 fat_suppressed=True),
        Contrast("ADC", "adc"),
    )
}


def _template_scale(anatomy: Anatomy, contrast: Contrast) -> float:
    """k = template median over WM > 0.9 ÷ modelled WM signal, so modelled tissues match the template's
    scale."""
    median_wm = float(np.median(anatomy.t1[anatomy.fractions["wm"] > 0.9]))
    return median_wm / contrast.tissue_signal(TISSUES["wm"])


def _class_signals(anatomy: Anatomy, contrast: Contrast) -> dict[str, float]:
    scale = _template_scale(anatomy, contrast) if contrast.brain_from_template else 1.0
    return {name: scale * contrast.tissue_signal(tissue) for name, tissue in TISSUES.items()}


@lru_cache(maxsize=16)
def _healthy(voxel_mm: int, contrast_name: str) -> np.ndarray:
    """Σ fraction × signal over the healthy classes (for ADC, the fraction-weighted ADC sum)."""
    anatomy = load_anatomy(voxel_mm)
    contrast = CONTRASTS[contrast_name]
    signals = _class_signals(anatomy, contrast)
    image = np.zeros(anatomy.shape, dtype=np.float32)
    for name in HEAD_CLASSES:
        if contrast.brain_from_template and name in BRAIN_CLASSES:
            continue
        image += np.float32(signals[name]) * anatomy.fractions[name]
    if contrast.brain_from_template:
        # "template T1 × healthy fraction": the template already mixes GM, WM and CSF.
        image += anatomy.t1 * fraction_sum(anatomy.fractions[name] for name in BRAIN_CLASSES)
    image.flags.writeable = False
    return image


@lru_cache(maxsize=2)
def _tissue_total(voxel_mm: int) -> np.ndarray:
    anatomy = load_anatomy(voxel_mm)
    total = fraction_sum(anatomy.fractions[name] for name in HEAD_CLASSES)
    total.flags.writeable = False
    return total


def signal_image(anatomy: Anatomy, lesion: PlantedLesion, contrast: Contrast) -> np.ndarray:
    """The noise-free image of ``contrast`` on the anatomy grid, lesion included (a new float32 array).

    For the ADC contrast the result is the fraction-weighted ADC in 10⁻³ mm²/s, 0 where tissue fractions sum
    to no more than 0.05.
    """
    voxel_mm = int(anatomy.voxel_mm)
    image = _healthy(voxel_mm, contrast.name).copy()
    if lesion.added:
        signals = _class_signals(anatomy, contrast)
        box = image[lesion.box]
        for name, fraction in lesion.added.items():
            box += np.float32(signals[name]) * fraction
        for name, fraction in lesion.removed.items():
            if contrast.brain_from_template:
                # Lesions only take brain classes, which the template shows; remove the template's share.
                box -= anatomy.t1[lesion.box] * fraction
            else:
                box -= np.float32(signals[name]) * fraction
        np.maximum(box, 0.0, out=box)  # float rounding must not produce negative magnitudes
    if contrast.kind == "adc":
        # Lesions swap equal amounts of tissue, so the healthy fraction total is still the right denominator.
        total = _tissue_total(voxel_mm)
        tissue = total > _ADC_MASK_FRACTION
        image[tissue] /= total[tissue]
        image[~tissue] = 0.0
    return image
