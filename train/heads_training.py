"""Training the heads on study embeddings: diagnoses, priority and referrals.

- Diagnoses: one MLP per diagnosis (``StackedMLPHeads``), binary cross-entropy with each label's positives
  weighted by its negative/positive ratio (rare findings are not drowned by normal studies). Uncertain or unknown
  labels (NaN) are left out of the loss. Each head's threshold is then chosen on validation data (Youden's J:
  the cut that maximises sensitivity + specificity - 1) and stored as the head's logit offset, so that the
  reported probability is 0.5 exactly at that cut.
- Priority: 3-class cross-entropy (none, low, high) weighted by inverse class frequency; targets come from the
  diagnosis ground truth through the diagnosis -> priority table.
- Referrals: like diagnoses, targets from the same table.

The embeddings are fixed (the study encoder is not trained here), which is what makes nightly retraining cheap.
The heads train on standardised embeddings (each feature centred and scaled by its training mean and standard
deviation: study embeddings of one encoder can differ between studies by a few thousandths only, too little for
an MLP trained from small data in a few hundred steps); the scaling is folded into the first layer of every
head afterwards, so the bundle's heads read the raw embedding as before.
Randomness derives from (seed, step); the loop checkpoints and resumes exactly.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from models.prima import PrimaModel
from train.checkpoint import TrainingInterrupted, load_checkpoint, restore, save_checkpoint, step_generator
from train.evaluation import aurocs_by_label, youden_threshold
from train.progress import MetricsSink, discard_metrics, monitor

log = logging.getLogger(__name__)


@dataclass
class HeadData:
    """Embeddings and targets of N studies. ``diagnosis``: (N, D) 1/0, NaN for unknown; ``priority``: (N,)
    class index; ``referral``: (N, R) 1/0."""

    embeddings: torch.Tensor
    diagnosis: np.ndarray
    priority: np.ndarray
    referral: np.ndarray

    def __len__(self) -> int:
        return len(self.embeddings)

    def subset(self, rows: np.ndarray) -> HeadData:
        rows = np.asarray(rows)
        return HeadData(self.embeddings[torch.as_tensor(rows)], self.diagnosis[rows], self.priority[rows],
                        self.referral[rows])


@dataclass(frozen=True)
class HeadsTrainingConfig:
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 1e-3
    max_positive_weight: float = 50.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 25


@dataclass
class HeadsReport:
    thresholds: dict[str, float]  # diagnosis -> logit threshold
    referral_thresholds: dict[str, float]
    positives: dict[str, int]  # diagnosis -> positives in the training data
    validation_auroc: dict[str, float] = field(default_factory=dict)
    history: dict[str, float] = field(default_factory=dict)


def _positive_weights(targets: np.ndarray, cap: float) -> torch.Tensor:
    known = ~np.isnan(targets)
    positives = np.nansum(targets, axis=0)
    negatives = known.sum(0) - positives
    weights = np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)
    return torch.as_tensor(np.clip(weights, 1.0, cap), dtype=torch.float32)


def _masked_bce(logits: torch.Tensor, targets: np.ndarray, positive_weight: torch.Tensor) -> torch.Tensor:
    target = torch.as_tensor(np.nan_to_num(targets, nan=0.0), dtype=torch.float32)
    known = torch.as_tensor(~np.isnan(targets), dtype=torch.float32)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=positive_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1.0)


def _choose_thresholds(margins: np.ndarray, targets: np.ndarray, fallback_margins: np.ndarray,
                       fallback_targets: np.ndarray) -> list[float]:
    thresholds = []
    for k in range(targets.shape[1]):
        cut = None
        for m, t in ((margins, targets), (fallback_margins, fallback_targets)):
            known = ~np.isnan(t[:, k])
            cut = youden_threshold(m[known, k], t[known, k])
            if cut is not None:
                break
        thresholds.append(0.0 if cut is None else cut)
    return thresholds


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The heads are small matrices: on a busy CPU, intra-op threads spin more than they compute."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _first_layers(prima: PrimaModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight (..., out, in), bias (..., out)) of the first layer of every head."""
    first = prima.priority_head[0]
    return [
        (prima.diagnosis_heads.weight(0), prima.diagnosis_heads.bias(0)),
        (prima.referral_heads.weight(0), prima.referral_heads.bias(0)),
        (first.weight, first.bias),
    ]


@torch.no_grad()
def _to_standardised(prima: PrimaModel, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Heads reading x -> the same functions of z = (x - mean) / std: W' = W std, b' = b + W mean."""
    for weight, bias in _first_layers(prima):
        bias += weight @ mean
        weight *= std


@torch.no_grad()
def _to_raw(prima: PrimaModel, mean: torch.Tensor, std: torch.Tensor) -> None:
    """The inverse of :func:`_to_standardised`: W = W' / std, b = b' - W mean."""
    for weight, bias in _first_layers(prima):
        weight /= std
        bias -= weight @ mean


def feature_scale(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation (floored at a thousandth of the median one)."""
    mean = embeddings.mean(0)
    std = embeddings.std(0, unbiased=False)
    floor = torch.clamp(std.median() * 1e-3, min=1e-8)
    return mean, torch.maximum(std, floor)


def train_heads(
    prima: PrimaModel,
    training: HeadData,
    validation: HeadData,
    config: HeadsTrainingConfig = HeadsTrainingConfig(),
    checkpoint_path=None,
    console: Console | None = None,
    sink: MetricsSink = discard_metrics,
    should_stop: Callable[[int], bool] | None = None,
) -> HeadsReport:
    """Train ``prima``'s heads in place (from their current weights) and set their thresholds."""
    with _one_thread():
        return _train_heads(prima, training, validation, config, checkpoint_path, console, sink, should_stop)


def _train_heads(
    prima: PrimaModel,
    training: HeadData,
    validation: HeadData,
    config: HeadsTrainingConfig,
    checkpoint_path,
    console: Console | None,
    sink: MetricsSink,
    should_stop: Callable[[int], bool] | None,
) -> HeadsReport:
    heads = {"diagnosis": prima.diagnosis_heads, "referral": prima.referral_heads, "priority": prima.priority_head}
    mean, std = feature_scale(training.embeddings)
    _to_standardised(prima, mean, std)  # a checkpoint, if resumed below, holds weights in this space too
    standardised = (training.embeddings - mean) / std
    for stacked in (prima.diagnosis_heads, prima.referral_heads):  # train on raw logits; thresholds come last
        stacked.set_columns_and_thresholds(stacked.column.tolist(), [0.0] * stacked.n_heads)
    parameters = [p for module in heads.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    diagnosis_weight = _positive_weights(training.diagnosis, config.max_positive_weight)
    referral_weight = _positive_weights(training.referral, config.max_positive_weight)
    counts = np.bincount(training.priority, minlength=len(prima.priority_classes)).astype(float)
    class_weight = torch.as_tensor(
        np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0), dtype=torch.float32
    )
    start, history = 0, {}
    if checkpoint_path is not None and (checkpoint := load_checkpoint(checkpoint_path)) is not None:
        restore(checkpoint, heads, {"adamw": optimizer})
        start, history = checkpoint.step, checkpoint.extra.get("history", {})
        log.info("heads training resumes at step %d from %s", start, checkpoint_path)
    for module in heads.values():
        module.train()
    batch_size = min(config.batch_size, len(training))
    recent: list[float] = []
    with monitor(console, "heads", "Heads (diagnosis, priority, referral)", config.steps, start, sink) as progress:
        for step in range(start, config.steps):
            if should_stop is not None and should_stop(step):
                if checkpoint_path is not None:
                    save_checkpoint(checkpoint_path, step, heads, {"adamw": optimizer}, {"history": history})
                raise TrainingInterrupted(step, checkpoint_path)
            generator = step_generator(config.seed, "heads", step)
            rows = torch.randperm(len(training), generator=generator)[:batch_size].numpy()
            x = standardised[torch.as_tensor(rows)]
            loss = (
                _masked_bce(prima.diagnosis_heads(x), training.diagnosis[rows], diagnosis_weight)
                + F.cross_entropy(prima.priority_head(x), torch.as_tensor(training.priority[rows]),
                                  weight=class_weight)
                + _masked_bce(prima.referral_heads(x), training.referral[rows], referral_weight)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recent.append(loss.item())
            history = {"loss": float(np.mean(recent[-config.log_every:]))}
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                progress.metrics(step + 1, history)
            progress.advance(status=f"loss {history['loss']:.3f}")
            if checkpoint_path is not None and (step + 1) % config.checkpoint_every == 0:
                save_checkpoint(checkpoint_path, step + 1, heads, {"adamw": optimizer}, {"history": history})
    for module in heads.values():
        module.eval()
    _to_raw(prima, mean, std)

    with torch.inference_mode():
        val_diag = prima.diagnosis_heads(validation.embeddings).numpy()
        val_ref = prima.referral_heads(validation.embeddings).numpy()
        train_diag = prima.diagnosis_heads(training.embeddings).numpy()
        train_ref = prima.referral_heads(training.embeddings).numpy()
    diagnosis_cuts = _choose_thresholds(val_diag, validation.diagnosis, train_diag, training.diagnosis)
    referral_cuts = _choose_thresholds(val_ref, validation.referral, train_ref, training.referral)
    prima.diagnosis_heads.set_columns_and_thresholds(prima.diagnosis_heads.column.tolist(), diagnosis_cuts)
    prima.referral_heads.set_columns_and_thresholds(prima.referral_heads.column.tolist(), referral_cuts)
    positives = {n: int(np.nansum(training.diagnosis[:, k])) for k, n in enumerate(prima.diagnosis_names)}
    return HeadsReport(
        thresholds=dict(zip(prima.diagnosis_names, diagnosis_cuts)),
        referral_thresholds=dict(zip(prima.referral_names, referral_cuts)),
        positives={n: c for n, c in positives.items() if c},
        validation_auroc=aurocs_by_label(val_diag, validation.diagnosis, prima.diagnosis_names),
        history=history,
    )
