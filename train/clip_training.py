"""Training the study encoder (hierarchical ViT) with the CLIP objective against report text.

Prima's recipe (``reference/prima.md`` §4): the study embedding (the study ViT's registers, LayerNorm'ed and
flattened) goes through the study ViT's ``mlp_head`` to the CLIP space; the report goes through a text tower to
the same space; a symmetric cross-entropy over the batch's image-text similarities pulls each study towards its
own report. Two reports with the same text, or with the same ground-truth findings when those are known (two
normal studies phrased differently, say), count as matches, so that equal findings are not pushed apart.

Patient discrimination (weight 0.03, as in Prima): each series' pooled registers (before the series head) go
through a small network (``patdisnet``; training only, not in the bundle) and a supervised contrastive loss makes
series of the same patient similar and those of other patients dissimilar, so the series embeddings keep what
identifies a study's images together.

Augmentation: each series keeps a random subset of its tokens every step (token order carries no information,
since the ViTs have no positional embedding). All randomness derives from (seed, step); the loop checkpoints and
resumes exactly.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from models.prima import HierViT, PrimaBatch
from train.checkpoint import TrainingInterrupted, load_checkpoint, restore, save_checkpoint, step_generator
from train.progress import MetricsSink, discard_metrics, monitor
from train.text_tower import ReportTextEncoder, ReportVocabulary

log = logging.getLogger(__name__)

PATIENT_DISCRIMINATION_WEIGHT = 0.03


@dataclass
class TrainingStudy:
    """One study as the study-encoder training sees it: tokens per series, its report and its patient."""

    key: str
    series: list[tuple[torch.Tensor, str]]  # (K, 289) tokens, series name
    report: str
    patient: str
    findings: frozenset[str] | None = None  # ground-truth labels when known: equal findings count as matches


@dataclass(frozen=True)
class ClipTrainingConfig:
    steps: int = 200
    batch_studies: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    patient_weight: float = PATIENT_DISCRIMINATION_WEIGHT
    token_keep: float = 0.5  # fraction of each series' tokens kept per step
    min_tokens: int = 16
    temperature: float = 0.1
    text_dim: int = 64
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10


class PatientDiscriminator(nn.Module):
    """``patdisnet``: pooled series registers -> a unit vector for the patient-discrimination loss."""

    def __init__(self, in_features: int, hidden: int = 500, out_features: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(pooled), dim=-1)


def encode_with_series(visual: HierViT, batch: PrimaBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(study embeddings (B, E), pooled series registers (S, inner registers x dim)): HierViT's forward with
    the series ViT's pooled output kept for the patient-discrimination loss."""
    names = visual.serieencoder(batch.name_ids).to(batch.tokens.dtype)
    pooled = visual.innerViT(torch.cat([names[:, None, :], batch.tokens], dim=1), batch.token_counts + 1)
    series = visual.innerViT.head(pooled)
    description = visual.studyencoder(batch.description_ids).to(series.dtype)
    counts = torch.bincount(batch.series_study, minlength=batch.n_studies)
    sequences = series.new_zeros(batch.n_studies, 1 + int(counts.max()), series.shape[1])
    sequences[:, 0] = description
    sequences[batch.series_study, 1 + batch.series_slot] = series
    return visual.outerViT(sequences, counts + 1), pooled


def clip_loss(image: torch.Tensor, text: torch.Tensor, same_text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE; ``same_text[i, j]`` marks pairs that count as matches.

    Both sides are centred on their batch mean before the cosine: at initialisation the register outputs of
    different studies agree to four decimals (the registers' attention averages over hundreds of tokens), and
    without centring the cosines are all ~1 and the loss barely moves."""
    image = image - image.mean(0, keepdim=True)
    text = text - text.mean(0, keepdim=True)
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / temperature
    targets = same_text.float() / same_text.float().sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
        + torch.sum(-targets.T * F.log_softmax(logits.T, dim=1), dim=1).mean()
    )


def patient_discrimination_loss(vectors: torch.Tensor, patients: Sequence[str], temperature: float) -> torch.Tensor:
    """Supervised contrastive loss over series: positives are the other series of the same patient."""
    n = len(patients)
    same = torch.tensor([[a == b for b in patients] for a in patients])
    not_self = ~torch.eye(n, dtype=torch.bool)
    positives = same & not_self
    anchors = positives.any(1)
    if not bool(anchors.any()):
        return vectors.sum() * 0.0
    logits = (vectors @ vectors.T / temperature).masked_fill(~not_self, float("-inf"))
    log_probability = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    per_anchor = -(log_probability.masked_fill(~positives, 0.0).sum(1) / positives.sum(1).clamp(min=1))
    return per_anchor[anchors].mean()


def _subsample(tokens: torch.Tensor, keep: float, minimum: int, generator: torch.Generator) -> torch.Tensor:
    count = max(min(minimum, len(tokens)), int(round(len(tokens) * keep)))
    rows = torch.randperm(len(tokens), generator=generator)[:count]
    return tokens[rows.sort().values]


def make_batch(studies: Sequence[TrainingStudy], description: str, keep: float = 1.0, minimum: int = 16,
               generator: torch.Generator | None = None) -> PrimaBatch:
    series = [
        [((_subsample(t, keep, minimum, generator) if generator is not None else t), name) for t, name in s.series]
        for s in studies
    ]
    return PrimaBatch.from_studies(series, [description] * len(studies))


def _same_findings(a: TrainingStudy, b: TrainingStudy) -> bool:
    if a.report == b.report:
        return True
    return a.findings is not None and b.findings is not None and a.findings == b.findings


class ClipTrainer(nn.Module):
    """The pieces CLIP training updates: the HierViT (shared with the bundle), the text tower and patdisnet."""

    def __init__(self, visual: HierViT, vocabulary: ReportVocabulary, config: ClipTrainingConfig) -> None:
        super().__init__()
        self.visual = visual
        clip_dim = visual.outerViT.mlp_head[0].out_features
        self.text = ReportTextEncoder(len(vocabulary), clip_dim, dim=config.text_dim)
        pooled = visual.innerViT.registers * visual.innerViT.dim
        self.patdisnet = PatientDiscriminator(pooled)


def train_clip(
    visual: HierViT,
    studies: Sequence[TrainingStudy],
    description: str,
    config: ClipTrainingConfig = ClipTrainingConfig(),
    checkpoint_path=None,
    console: Console | None = None,
    sink: MetricsSink = discard_metrics,
    should_stop: Callable[[int], bool] | None = None,
) -> dict[str, float]:
    """Train ``visual`` in place; returns the last logged metrics. Resumes from ``checkpoint_path`` if present."""
    vocabulary = ReportVocabulary.from_corpus([s.report for s in studies])
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        trainer = ClipTrainer(visual, vocabulary, config)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    start, history = 0, {}
    if checkpoint_path is not None and (checkpoint := load_checkpoint(checkpoint_path)) is not None:
        restore(checkpoint, {"trainer": trainer}, {"adamw": optimizer})
        start, history = checkpoint.step, checkpoint.extra.get("history", {})
        log.info("CLIP training resumes at step %d from %s", start, checkpoint_path)
    text_ids = vocabulary.encode([s.report for s in studies])
    trainer.train()
    losses: list[tuple[float, float]] = []
    batch_size = min(config.batch_studies, len(studies))
    with monitor(console, "clip", "Study encoder (CLIP + patient discrimination)", config.steps, start,
                 sink) as progress:
        for step in range(start, config.steps):
            if should_stop is not None and should_stop(step):
                if checkpoint_path is not None:
                    save_checkpoint(checkpoint_path, step, {"trainer": trainer}, {"adamw": optimizer},
                                    {"history": history})
                raise TrainingInterrupted(step, checkpoint_path)
            generator = step_generator(config.seed, "clip", step)
            chosen = torch.randperm(len(studies), generator=generator)[:batch_size].tolist()
            batch_studies = [studies[i] for i in chosen]
            batch = make_batch(batch_studies, description, config.token_keep, config.min_tokens, generator)
            embedding, pooled = encode_with_series(trainer.visual, batch)
            image = trainer.visual.outerViT.head(embedding)
            text = trainer.text(text_ids[chosen])
            same_text = torch.tensor([[_same_findings(a, b) for b in batch_studies] for a in batch_studies])
            loss_clip = clip_loss(image, text, same_text, config.temperature)
            patients = [batch_studies[int(b)].patient for b in batch.series_study]
            loss_patient = patient_discrimination_loss(trainer.patdisnet(pooled), patients, config.temperature)
            loss = loss_clip + config.patient_weight * loss_patient
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
            optimizer.step()
            losses.append((loss_clip.item(), loss_patient.item()))
            recent = np.array(losses[-config.log_every:])
            history = {"clip_loss": float(recent[:, 0].mean()), "patient_loss": float(recent[:, 1].mean())}
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                progress.metrics(step + 1, history)
            progress.advance(status=f"CLIP {history['clip_loss']:.3f}")
            if checkpoint_path is not None and (step + 1) % config.checkpoint_every == 0:
                save_checkpoint(checkpoint_path, step + 1, {"trainer": trainer}, {"adamw": optimizer},
                                {"history": history})
    visual.eval()
    return history


@torch.inference_mode()
def study_embeddings(visual: HierViT, studies: Sequence[TrainingStudy], description: str,
                     batch_size: int = 8) -> torch.Tensor:
    """(N, E) study embeddings of all tokens of each study, as the worker computes them."""
    visual.eval()
    parts = [visual(make_batch(studies[i : i + batch_size], description)) for i in range(0, len(studies), batch_size)]
    return torch.cat(parts)
