"""The training loops: seeded, checkpointed, and an interrupted run resumed ends exactly where an uninterrupted
one does (issue 8, acceptance 3). Small synthetic inputs: these are about the loops, not about accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.labels import DIAGNOSIS_NAMES
from models.prima import PRIMA_CONFIGS, PrimaModel
from models.tokenizer import TOKEN_FEATURES
from models.vqvae import build_vqvae
from train.checkpoint import TrainingInterrupted
from train.clip_training import (
    ClipTrainingConfig,
    TrainingStudy,
    patient_discrimination_loss,
    study_embeddings,
    train_clip,
)
from train.heads_training import HeadData, HeadsTrainingConfig, train_heads
from train.triage_table import load_triage_table
from train.vqvae_training import VQVAETrainingConfig, permute_axes, train_vqvae


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _stop_at(step: int):
    return lambda s: s == step


def _prima(seed: int = 0) -> PrimaModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return PrimaModel(PRIMA_CONFIGS["tiny"])


def _head_data(n: int, seed: int) -> HeadData:
    """Embeddings in which three diagnoses each shift a direction of their own."""
    rng = np.random.default_rng(seed)
    labels = ["trauma_subdural_hematoma", "vascular_ischemic_large_vessel_stroke", "ventricular_ventriculomegaly"]
    diagnosis = np.zeros((n, len(DIAGNOSIS_NAMES)), dtype=np.float32)
    x = rng.normal(size=(n, 128)).astype(np.float32)
    for row in range(n):
        k = row % 4
        if k < 3:
            diagnosis[row, DIAGNOSIS_NAMES.index(labels[k])] = 1.0
            x[row, k * 10:(k + 1) * 10] += 3.0
    priority, referral = load_triage_table().targets(diagnosis)
    return HeadData(torch.from_numpy(x), diagnosis, priority, referral)


def test_interrupted_head_training_resumes_to_the_same_weights_and_thresholds(tmp_path):
    training, validation = _head_data(48, 1), _head_data(24, 2)
    config = HeadsTrainingConfig(steps=60, checkpoint_every=20, seed=3)

    straight = _prima()
    report = train_heads(straight, training, validation, config, tmp_path / "a.pt")

    interrupted = _prima()
    with pytest.raises(TrainingInterrupted) as stopped:
        train_heads(interrupted, training, validation, config, tmp_path / "b.pt", should_stop=_stop_at(37))
    assert stopped.value.step == 37
    resumed = _prima()  # a fresh process: nothing but the checkpoint carries over
    resumed_report = train_heads(resumed, training, validation, config, tmp_path / "b.pt")

    assert _same_weights(straight, resumed)
    assert resumed_report.thresholds == report.thresholds
    assert report.validation_auroc["trauma_subdural_hematoma"] > 0.9


def test_interrupted_vqvae_training_resumes_to_the_same_weights(tmp_path):
    patches = torch.rand(24, 1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    config = VQVAETrainingConfig(steps=6, batch_size=4, checkpoint_every=2, seed=5)

    def fresh():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return build_vqvae("tiny")

    straight = fresh()
    train_vqvae(straight, patches, config, tmp_path / "a.pt")
    interrupted = fresh()
    with pytest.raises(TrainingInterrupted):
        train_vqvae(interrupted, patches, config, tmp_path / "b.pt", should_stop=_stop_at(3))
    resumed = fresh()
    train_vqvae(resumed, patches, config, tmp_path / "b.pt")
    assert _same_weights(straight, resumed)


def _synthetic_studies(n: int) -> list[TrainingStudy]:
    generator = torch.Generator().manual_seed(11)
    reports = ["FINDINGS: normal brain.", "FINDINGS: left subdural haematoma.", "FINDINGS: acute infarct."]
    studies = []
    for i in range(n):
        series = [(torch.randn(20 + 3 * s, TOKEN_FEATURES, generator=generator), f"ax_series_{s}")
                  for s in range(2)]
        studies.append(TrainingStudy(f"s{i}", series, reports[i % 3], patient=f"p{i}"))
    return studies


def test_interrupted_clip_training_resumes_to_the_same_weights(tmp_path):
    studies = _synthetic_studies(6)
    config = ClipTrainingConfig(steps=5, batch_studies=4, checkpoint_every=2, seed=2, min_tokens=8)

    straight = _prima().visual
    train_clip(straight, studies, "MRI BRAIN", config, tmp_path / "a.pt")
    interrupted = _prima().visual
    with pytest.raises(TrainingInterrupted):
        train_clip(interrupted, studies, "MRI BRAIN", config, tmp_path / "b.pt", should_stop=_stop_at(3))
    resumed = _prima().visual
    train_clip(resumed, studies, "MRI BRAIN", config, tmp_path / "b.pt")

    assert _same_weights(straight, resumed)
    assert torch.equal(study_embeddings(straight, studies, "MRI BRAIN"),
                       study_embeddings(resumed, studies, "MRI BRAIN"))


def test_patient_discrimination_loss_prefers_series_of_one_patient_together():
    together = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    apart = together[[0, 2, 1, 3]]
    patients = ["a", "a", "b", "b"]
    assert patient_discrimination_loss(together, patients, 0.1) < patient_discrimination_loss(apart, patients, 0.1)


def test_random_axis_permutation_turns_an_axial_patch_into_the_other_orientations():
    patch = torch.zeros(1, 1, 8, 32, 32)
    assert permute_axes(patch, (1, 0, 2)).shape == (1, 1, 32, 8, 32)
    assert permute_axes(patch, (1, 2, 0)).shape == (1, 1, 32, 32, 8)


def test_heads_train_on_standardised_embeddings_but_read_the_raw_ones_afterwards():
    from train.heads_training import _to_raw, _to_standardised, feature_scale

    prima = _prima()
    x = torch.randn(16, 128) * 0.003 + 5.0  # embeddings that barely differ, as an encoder's can
    mean, std = feature_scale(x)
    with torch.no_grad():
        before = prima.heads(x).diagnosis_logits
        _to_standardised(prima, mean, std)
        assert torch.allclose(prima.heads((x - mean) / std).diagnosis_logits, before, atol=1e-4)
        _to_raw(prima, mean, std)
        assert torch.allclose(prima.heads(x).diagnosis_logits, before, atol=1e-4)
