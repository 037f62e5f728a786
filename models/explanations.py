"""LIME over the volume tokens of one series: which tokens drive a head's output, and where they are.

The reference (Prima ``util_lime.py``, ``reference/prima.md`` §8) explains one series of a study at a time. Its
features are the series' kept tokens; a perturbed sample *removes* the tokens whose mask bit is 0 (the other
series stay whole). Masks come from ``RandomState(seed).randint(0, 2, samples * tokens)``, row 0 is all ones
(the unperturbed study) and an all-zero row becomes all ones. Every sample is at distance 0 from the original,
so every sample weighs 1. The surrogate is lime's ``LimeBase`` without feature selection: a weighted
``Ridge(alpha=1)`` with an intercept, its R^2 on the samples and its prediction for row 0.

Here the samples run in batches: the other series' embeddings are computed once, and each batch re-encodes only
the explained series (its kept tokens gathered to the front, the rest masked out of attention - the same as
removing them, since the ViTs have no positional embedding) and the study ViT and heads. The ridge is a few
lines of NumPy in float64 (:func:`weighted_ridge`). :func:`token_locations` maps the top tokens back to patient
coordinates and source-image polygons (:mod:`models.regions`) for the SR.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.prima import PrimaBatch, PrimaModel, StudyOutput
from models.regions import SourceRegion, token_regions
from models.tokenizer import SeriesTokens
from models.volume import SeriesVolume

#: A function of the heads' output for a batch of perturbed studies -> (B,) values to explain.
Target = Callable[[StudyOutput], torch.Tensor]


def lime_masks(n_tokens: int, samples: int, seed: int = 0) -> np.ndarray:
    """(samples, n_tokens) float64 0/1 masks drawn as the reference draws them; row 0 keeps every token."""
    random_state = np.random.RandomState(seed)
    masks = random_state.randint(0, 2, n_tokens * samples).reshape(samples, n_tokens).astype(np.float64)
    masks[0] = 1
    masks[masks.sum(axis=1) == 0] = 1  # a study without the series would not be a perturbation of it
    return masks


@dataclass(frozen=True)
class RidgeFit:
    intercept: float
    coefficients: np.ndarray  # (features,)
    score: float  # weighted R^2 on the samples
    local_prediction: float  # the surrogate's value for row 0 (the unperturbed input)


def weighted_ridge(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, alpha: float = 1.0
) -> RidgeFit:
    """Ridge regression with an unpenalised intercept and sample weights, as scikit-learn's ``Ridge`` fits it.

    Centre x and y on their weighted means, scale rows by sqrt(weight), solve the penalised normal equations
    (in the dual form when there are fewer samples than features: same solution, smaller system).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    x_mean = np.average(x, axis=0, weights=w)
    y_mean = np.average(y, weights=w)
    root = np.sqrt(w)[:, None]
    xs = (x - x_mean) * root
    ys = (y - y_mean) * root[:, 0]
    n, p = xs.shape
    if n < p:
        coefficients = xs.T @ np.linalg.solve(xs @ xs.T + alpha * np.eye(n), ys)
    else:
        coefficients = np.linalg.solve(xs.T @ xs + alpha * np.eye(p), xs.T @ ys)
    intercept = float(y_mean - x_mean @ coefficients)
    predicted = x @ coefficients + intercept
    residual = np.sum(w * (y - predicted) ** 2)
    total = np.sum(w * (y - y_mean) ** 2)
    score = 1.0 - residual / total if total > 0 else 0.0
    return RidgeFit(intercept, coefficients, float(score), float(predicted[0]))


@dataclass
class TokenExplanation:
    """LIME result for one series: a weight per kept token (index into the series' tokens)."""

    series_index: int
    masks: np.ndarray  # (samples, tokens)
    labels: np.ndarray  # (samples,) the target on each perturbed study
    fit: RidgeFit

    @property
    def weights(self) -> np.ndarray:
        return self.fit.coefficients

    def ranked(self) -> list[tuple[int, float]]:
        """(token, weight) by decreasing |weight|, as lime lists them."""
        order = np.argsort(-np.abs(self.weights), kind="stable")
        return [(int(i), float(self.weights[i])) for i in order]

    def top(self, n: int, positive_only: bool = True) -> list[tuple[int, float]]:
        ranked = self.ranked()
        if positive_only:
            ranked = [(i, w) for i, w in ranked if w > 0]
        return ranked[:n]


def diagnosis_logit(model: PrimaModel, name: str) -> Target:
    """The raw logit of a diagnosis head (threshold added back), what the reference explains."""
    index = model.diagnosis_names.index(name)

    def target(output: StudyOutput) -> torch.Tensor:
        return output.diagnosis_logits[:, index] + model.diagnosis_heads.threshold[index].float()

    return target


@torch.inference_mode()
def explain_series(
    model: PrimaModel,
    study: Sequence[tuple[torch.Tensor, str]],
    description: str,
    series_index: int,
    target: Target,
    samples: int = 1000,
    seed: int = 0,
    batch_size: int = 128,
    alpha: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> TokenExplanation:
    """LIME over the tokens of ``study[series_index]`` for ``target`` (e.g. :func:`diagnosis_logit`).

    ``study``: [(tokens (K, 289), series name), ...] on the model's device. ``autocast_dtype``: run the
    networks under autocast (bf16 on a GPU); the ridge is always fitted in float64.
    """
    return explain_series_targets(model, study, description, series_index, [target], samples, seed, batch_size,
                                  alpha, autocast_dtype)[0]


@torch.inference_mode()
def explain_series_targets(
    model: PrimaModel,
    study: Sequence[tuple[torch.Tensor, str]],
    description: str,
    series_index: int,
    targets: Sequence[Target],
    samples: int = 1000,
    seed: int = 0,
    batch_size: int = 128,
    alpha: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> list[TokenExplanation]:
    """:func:`explain_series` for several targets over the same series: the masks depend only on the series'
    token count and the seed, so one pass of the networks over the perturbed studies serves every target, and
    each target's explanation is the one a run of its own would give."""
    tokens, _name = study[series_index]
    n_tokens = tokens.shape[0]
    masks = lime_masks(n_tokens, samples, seed)
    device = tokens.device
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else torch.autocast(device.type, enabled=False)
    )
    base = PrimaBatch.from_studies([list(study)], [description])
    labels: list[list[torch.Tensor]] = [[] for _ in targets]
    with autocast:
        series = model.visual.series_embeddings(base)  # (S, d): every series once, unperturbed
        n_series = series.shape[0]
        for start in range(0, samples, batch_size):
            keep = torch.as_tensor(masks[start : start + batch_size] > 0, device=device)
            b = keep.shape[0]
            # Kept tokens to the front (stable), the rest beyond each row's length: out of attention.
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            variant = PrimaBatch(
                tokens=tokens[order],
                token_counts=keep.sum(dim=1),
                name_ids=base.name_ids[series_index : series_index + 1].expand(b, -1),
                series_study=torch.arange(b, device=device),
                series_slot=torch.zeros(b, dtype=torch.long, device=device),
                description_ids=base.description_ids.expand(b, -1),
            )
            perturbed = series.unsqueeze(0).repeat(b, 1, 1)
            perturbed[:, series_index] = model.visual.series_embeddings(variant).to(series.dtype)
            embedding = model.visual.study_embeddings(
                perturbed.reshape(b * n_series, -1),
                torch.arange(b, device=device).repeat_interleave(n_series),
                torch.arange(n_series, device=device).repeat(b),
                base.description_ids.expand(b, -1),
            )
            output = model.heads(embedding)
            for values, target in zip(labels, targets):
                values.append(target(output).float().cpu())
    explanations = []
    for values in labels:
        y = torch.cat(values).double().numpy()
        explanations.append(TokenExplanation(series_index, masks, y, weighted_ridge(masks, y, np.ones(samples), alpha)))
    return explanations


@dataclass(frozen=True)
class TokenLocation:
    token: int
    weight: float
    centre_lps: tuple[float, float, float]  # centre of the token's patch (inside the volume), patient mm
    regions: list[SourceRegion]  # the patch outlined on each source image it covers


def token_locations(
    volume: SeriesVolume, tokens: SeriesTokens, ranked: Sequence[tuple[int, float]]
) -> list[TokenLocation]:
    """Patient coordinates and source-image polygons of explained tokens ((token, weight) pairs)."""
    locations = []
    shape = np.asarray(tokens.patch_shape)
    size = np.asarray(volume.array.shape)
    for token, weight in ranked:
        low = np.maximum(tokens.patch_origin[token], 0)
        high = np.minimum(tokens.patch_origin[token] + shape, size)
        centre = volume.index_to_patient((low + high - 1) / 2.0)[0]
        locations.append(
            TokenLocation(
                int(token),
                float(weight),
                tuple(float(c) for c in centre),  # type: ignore[arg-type]
                token_regions(volume, tokens, token),
            )
        )
    return locations
