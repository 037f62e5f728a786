"""The configuration's ``training`` and ``fairness`` sections as the dataclasses train's jobs take.

Train never reads the configuration: the composition root builds these from the settings (each default written
once, in ``worker/config.py``) and passes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from train.fairness.analysis import FairnessConfig
from worker.config import FairnessSettings, GateSettings, Settings

if TYPE_CHECKING:
    from train.nightly import GateConfig, NightlyConfig

#: Checkpoints of the heads' retraining every this many steps (a resumed night repeats at most these).
HEADS_CHECKPOINT_EVERY = 50


def gate_config(gates: GateSettings) -> GateConfig:
    """From ``training.gates``."""
    # torch (train.nightly's module): kept out of the commands that import this module but train nothing.
    from train.nightly import GateConfig

    return GateConfig(
        max_mean_auroc_drop=float(gates.max_mean_auroc_drop),
        max_label_auroc_drop=float(gates.max_label_auroc_drop),
        max_calibration_increase=float(gates.max_calibration_increase),
        max_disparity_increase=float(gates.max_disparity_increase),
        min_group_units=int(gates.min_group_units),
        min_held_out=int(gates.min_held_out),
    )


def nightly_config(settings: Settings) -> NightlyConfig:
    """From the ``training`` section (and ``model``: the fallback bundle, the device, the study description)."""
    # torch, as in gate_config.
    from train.heads_training import HeadsTrainingConfig
    from train.nightly import NightlyConfig

    training = settings.training
    var = settings.var_dir
    return NightlyConfig(
        models_dir=Path(training.models_dir or var / "models"),
        work_dir=Path(training.work_dir or var / "training"),
        seed=int(training.seed),
        held_out_fraction=float(training.held_out_fraction),
        validation_fraction=float(training.validation_fraction),
        min_new_studies=int(training.min_new_studies),
        min_training_studies=int(training.min_training_studies),
        triage_table=str(training.triage_table or ""),
        heads=HeadsTrainingConfig(steps=int(training.heads_steps),
                                  learning_rate=float(training.heads_learning_rate),
                                  seed=int(training.seed), checkpoint_every=HEADS_CHECKPOINT_EVERY),
        gates=gate_config(training.gates),
        configured_bundle=str(settings.model.bundle or ""),
        device=str(settings.model.device),
        study_description=str(settings.model.study_description),
        fairness=fairness_config(settings.fairness),
    )


def fairness_config(fairness: FairnessSettings) -> FairnessConfig:
    """From the ``fairness`` section."""
    bootstrap = fairness.bootstrap
    return FairnessConfig(
        long_turnaround_days=tuple(float(days) for days in fairness.long_turnaround_days),
        min_group_size=int(fairness.min_group_size),
        min_group_units=int(fairness.min_group_units),
        attributes=tuple(fairness.attributes),
        intersections=tuple(tuple(pair) for pair in fairness.intersections),
        reference_groups=dict(fairness.reference_groups or {}),
        sample_size=int(bootstrap.sample_size),
        iterations=int(bootstrap.iterations),
        seed=int(bootstrap.seed),
        alpha=float(fairness.alpha),
        correction=str(fairness.correction),
        min_disparity=float(fairness.min_disparity),
    )
