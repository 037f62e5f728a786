"""Parity with the public Prima reference on random weights (fixtures: tests/fixtures/prima_parity/README.md).

The reference (MLNeurosurg/Prima) was run at a reduced size with seed 0 on phantom volumes; its state dicts, in
the official key layout, and its outputs are the fixtures. The same state dicts loaded into our models must give
the same tokens (same patches, same order), VQ-VAE latents, study embedding and head outputs (fp32, CPU) and the
same LIME samples and fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.explanations import diagnosis_logit, explain_series, lime_masks, weighted_ridge
from models.prima import PrimaBatch, PrimaModel, convert_reference_state_dict
from models.reference_checkpoint import load_reference_prima, vqvae_widths_of
from models.tokenizer import token_features, tokenize_volume, vqvae_input
from models.volume import SeriesVolume
from models.vqvae import build_vqvae, encode_patches

FIXTURES = Path(__file__).parents[1] / "fixtures" / "prima_parity"
SERIES = ("axial", "coronal", "sagittal")
THIN_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
TOLERANCE = 1e-4  # acceptance: max abs difference in fp32


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "parity.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def vqvae():
    state = torch.load(FIXTURES / "vqvae_reduced.pt", weights_only=True)
    model = build_vqvae(vqvae_widths_of(state))
    model.load_state_dict(state, strict=True)  # the reference's 47 keys, unchanged
    return model.eval()


@pytest.fixture(scope="module")
def prima() -> PrimaModel:
    """The reference's plain state dict, converted by key prefix only, in a model of the checkpoint's shape."""
    checkpoint = load_reference_prima(
        FIXTURES / "fullmodel_reduced.pt"
    )  # architecture, names, columns, thresholds
    model = PrimaModel(
        checkpoint.config,
        diagnosis_names=checkpoint.diagnosis.names,
        referral_names=checkpoint.referral.names,
        priority_classes=checkpoint.priority_classes,
        diagnosis_outputs=checkpoint.diagnosis.widths[-1],
        referral_outputs=checkpoint.referral.widths[-1],
    )
    reference_state = torch.load(FIXTURES / "fullmodel_reduced_state.pt", weights_only=True)
    model.load_state_dict(convert_reference_state_dict(reference_state), strict=True)
    model.diagnosis_heads.set_columns_and_thresholds(
        checkpoint.diagnosis.columns, checkpoint.diagnosis.thresholds
    )
    model.referral_heads.set_columns_and_thresholds(
        checkpoint.referral.columns, checkpoint.referral.thresholds
    )
    return model.eval()


def phantom(expected: dict[str, np.ndarray], series: str) -> SeriesVolume:
    array = (expected[f"{series}_volume"].astype(np.float64) / expected[f"{series}_divisor"]).astype(
        np.float32
    )
    return SeriesVolume(series, series, array, np.eye(4), THIN_AXIS[series], source=[])


def our_tokens(expected, vqvae, series: str) -> torch.Tensor:
    tokens = tokenize_volume(phantom(expected, series))
    with torch.inference_mode():
        latents = encode_patches(vqvae, vqvae_input(torch.from_numpy(tokens.patches), tokens.thin_axis))
        return token_features(latents, tokens)


def reference_study(expected) -> list[tuple[torch.Tensor, str]]:
    return [
        (torch.from_numpy(expected[f"{s}_tokens"]), str(name))
        for s, name in zip(SERIES, expected["series_names"])
    ]


def max_difference(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


@pytest.mark.parametrize("series", SERIES)
def test_tokenizer_keeps_the_reference_patches_in_the_reference_order(expected, series: str) -> None:
    tokens = tokenize_volume(phantom(expected, series))
    padding_before = tokens.grid_index[0] * tokens.patch_shape - tokens.patch_origin[0]

    assert tokens.percent == int(expected[f"{series}_percent"])
    # The reference's coordinates are patch starts in the padded volume; duplicates (infill) included.
    assert np.array_equal(tokens.patch_origin + padding_before, expected[f"{series}_coords"])


@pytest.mark.parametrize("series", SERIES)
def test_vqvae_input_and_latents_match_the_reference(expected, vqvae, series: str) -> None:
    tokens = tokenize_volume(phantom(expected, series))
    reference_input = torch.from_numpy(expected[f"{series}_vq_input"])
    patch_index = list(expected[f"{series}_patch_index"])
    distinct = np.unique(patch_index)[: len(reference_input)]
    # Token j is the same patch on both sides (previous test): take each patch's first token.
    ours = torch.from_numpy(tokens.patches[[tokens.token_patch[patch_index.index(i)] for i in distinct]])

    model_input = vqvae_input(ours, tokens.thin_axis)
    assert torch.equal(model_input, reference_input)  # slice repetition == MONAI Resize "area" for 4 -> 8
    with torch.inference_mode():
        latents = encode_patches(vqvae, model_input)
    assert max_difference(latents, expected[f"{series}_vq_latents"]) <= 1e-5


@pytest.mark.parametrize("series", SERIES)
def test_tokens_match_the_reference_tokens(expected, vqvae, series: str) -> None:
    ours = our_tokens(expected, vqvae, series)
    reference = expected[f"{series}_tokens"]
    assert ours.shape == reference.shape
    assert max_difference(ours[:, 256:], reference[:, 256:]) <= 1e-6  # position and orientation features
    assert max_difference(ours, reference) <= 1e-5


def assert_outputs_match(output, expected, model: PrimaModel) -> None:
    assert max_difference(output.embedding, expected["clip_emb"]) <= TOLERANCE
    assert list(model.diagnosis_names) == list(expected["diagnosis_names"])  # the checkpoint's order
    assert max_difference(output.diagnosis_logits[0], expected["diagnosis"]) <= TOLERANCE
    assert list(model.referral_names) == list(expected["referral_names"])
    assert max_difference(output.referral_logits[0], expected["referral"]) <= TOLERANCE
    assert list(model.priority_classes) == list(expected["priority_names"])
    assert max_difference(output.priority_logits[0], expected["priority"]) <= TOLERANCE


def test_study_embedding_and_heads_match_the_reference_for_the_reference_tokens(expected, prima) -> None:
    batch = PrimaBatch.from_studies([reference_study(expected)], [str(expected["study_description"])])
    with torch.inference_mode():
        output = prima(batch)
    assert output.embedding.shape == expected["clip_emb"].shape
    assert_outputs_match(output, expected, prima)


def test_whole_pipeline_from_volumes_matches_the_reference(expected, vqvae, prima) -> None:
    study = [(our_tokens(expected, vqvae, s), str(n)) for s, n in zip(SERIES, expected["series_names"])]
    with torch.inference_mode():
        output = prima(PrimaBatch.from_studies([study], [str(expected["study_description"])]))
    assert_outputs_match(output, expected, prima)


def test_safe_loader_gives_the_reference_state_dict_and_the_same_outputs(expected, prima) -> None:
    checkpoint = load_reference_prima(FIXTURES / "fullmodel_reduced.pt")
    model = checkpoint.build_model()
    assert model.state_dict().keys() == prima.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in prima.state_dict().items())
    with torch.inference_mode():
        output = model(
            PrimaBatch.from_studies([reference_study(expected)], [str(expected["study_description"])])
        )
    assert_outputs_match(output, expected, model)


def test_lime_draws_the_reference_masks_and_fits_the_reference_surrogate(expected) -> None:
    masks = lime_masks(expected["lime_masks"].shape[1], expected["lime_masks"].shape[0], seed=0)
    assert np.array_equal(masks, expected["lime_masks"])

    fit = weighted_ridge(masks, expected["lime_labels"], np.ones(len(masks)), alpha=1.0)
    assert fit.intercept == pytest.approx(float(expected["lime_intercept"]), abs=1e-8)
    weights = fit.coefficients[expected["lime_features"]]
    assert max_difference(weights, expected["lime_weights"]) <= 1e-8
    assert fit.score == pytest.approx(float(expected["lime_score"]), abs=1e-8)
    assert fit.local_prediction == pytest.approx(float(expected["lime_local_pred"]), abs=1e-8)


def test_batched_lime_over_the_first_series_reproduces_the_reference_labels_and_ranking(
    expected, prima
) -> None:
    samples = expected["lime_masks"].shape[0]
    explanation = explain_series(
        prima,
        reference_study(expected),
        str(expected["study_description"]),
        series_index=0,
        target=diagnosis_logit(prima, "tumor_adult_glioma"),
        samples=samples,
        batch_size=32,
    )
    assert max_difference(explanation.labels, expected["lime_labels"]) <= TOLERANCE
    ranked = [token for token, _ in explanation.ranked()]
    assert ranked[:10] == list(expected["lime_features"][:10])
    assert explanation.fit.intercept == pytest.approx(float(expected["lime_intercept"]), abs=1e-3)
