"""The whole tiny model trained on phantom studies by the training loops, and evaluated on held-out phantoms.

Stages, each with a progress bar and a checkpoint (a finished stage's checkpoint is its result, so a run that
stops anywhere resumes where it was):

1. phantom corpus: ``per_lesion`` studies of each lesion type written, tokenised and cached
   (:mod:`train.phantom_corpus`);
2. VQ-VAE: L1 reconstruction of training patches under random axis permutation (:mod:`train.vqvae_training`);
3. tokens: every study's kept patches through the trained encoder (as the worker does);
4. study encoder: CLIP against the phantoms' synthetic reports plus patient discrimination
   (:mod:`train.clip_training`);
5. heads on the frozen embeddings, thresholds on the validation studies (:mod:`train.heads_training`);
6. evaluation on the held-out studies: AUROC of every planted lesion's labels and of priority "high".

Studies are split by position in the plan, the same way for every lesion: the last ``held_out_per_lesion`` of
each lesion are held out, the ``validation_per_lesion`` before them choose the thresholds, the rest train.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import VQVAE
from rich.console import Console

from models.backbone import backbone_id
from models.labels import DIAGNOSIS_NAMES
from models.prima import PRIMA_CONFIGS, PrimaModel
from models.tokenizer import SeriesTokens, token_features
from models.vqvae import build_vqvae
from train.checkpoint import load_checkpoint
from train.clip_training import ClipTrainingConfig, TrainingStudy, study_embeddings, train_clip
from train.evaluation import auroc, expected_calibration_error
from train.heads_training import HeadData, HeadsTrainingConfig, train_heads
from train.phantom_corpus import CachedStudy, build_phantom_corpus, code_fingerprint, phantom_plan
from train.phantoms import LESION_LABELS, LESIONS
from train.progress import MetricsSink, discard_metrics
from train.triage_table import TriageTable, load_triage_table
from train.vqvae_training import (
    VQVAETrainingConfig,
    encode_series_latents,
    train_vqvae,
    vqvae_training_patches,
)

log = logging.getLogger(__name__)

STUDY_DESCRIPTION = "MRI BRAIN WO AND W CONTRAST"


@dataclass(frozen=True)
class PhantomTrainingPlan:
    per_lesion: int = 12
    held_out_per_lesion: int = 3
    validation_per_lesion: int = 2
    seed: int = 0
    first_phantom_seed: int = 0
    vqvae_patches_per_series: int = 24
    vqvae: VQVAETrainingConfig = VQVAETrainingConfig(steps=60, batch_size=16, checkpoint_every=20)
    clip: ClipTrainingConfig = ClipTrainingConfig(steps=80, batch_studies=8, token_keep=0.5, checkpoint_every=20)
    heads: HeadsTrainingConfig = HeadsTrainingConfig(steps=150, checkpoint_every=50)

    def fingerprint(self) -> str:
        return _digest(asdict(self))


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class PhantomTrainingResult:
    vqvae: VQVAE
    prima: PrimaModel
    metrics: dict
    table: TriageTable
    plan: PhantomTrainingPlan
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def backbone_id(self) -> str:
        return backbone_id(self.vqvae, self.prima)


def lesions_in_corpus() -> tuple[str, ...]:
    return tuple(LESIONS)


def planted_labels() -> list[str]:
    """Every Prima label a planted lesion implies, in the label table's order."""
    wanted = {label for labels in LESION_LABELS.values() for label in labels}
    return [name for name in DIAGNOSIS_NAMES if name in wanted]


def split_rows(plan: PhantomTrainingPlan, n_lesions: int) -> tuple[list[int], list[int], list[int]]:
    """(training, validation, held-out) row numbers of the corpus built from ``phantom_plan``."""
    train, validation, held_out = [], [], []
    for i in range(plan.per_lesion):
        target = train
        if i >= plan.per_lesion - plan.held_out_per_lesion:
            target = held_out
        elif i >= plan.per_lesion - plan.held_out_per_lesion - plan.validation_per_lesion:
            target = validation
        target.extend(i * n_lesions + j for j in range(n_lesions))
    return train, validation, held_out


def training_study(cached: CachedStudy, vqvae: VQVAE) -> TrainingStudy:
    """A cached study's tokens through ``vqvae``: the 289-d tokens the ViT reads, per series."""
    series = []
    for s in cached.series:
        latents = encode_series_latents(vqvae, s.patches, s.thin_axis)
        layout = SeriesTokens(
            series_instance_uid="", name=s.name, thin_axis=s.thin_axis, patch_shape=tuple(s.patches.shape[1:]),
            patches=s.patches, token_patch=s.token_patch, grid_index=s.grid_index, patch_origin=s.grid_index,
            foreground=np.zeros(len(s.token_patch)), percent=0, total_patches=0,
        )
        series.append((token_features(latents, layout), s.name))
    return TrainingStudy(cached.key, series, cached.report, patient=cached.key, findings=frozenset(cached.labels))


def evaluate_held_out(prima: PrimaModel, embeddings: torch.Tensor, diagnosis: np.ndarray,
                      priority: np.ndarray) -> dict:
    """AUROC of each planted label and of priority "high" (P(high) against high vs not high), and the
    calibration error of the planted labels' probabilities."""
    with torch.inference_mode():
        output = prima.heads(embeddings)
    labels = planted_labels()
    columns = [prima.diagnosis_names.index(label) for label in labels]
    margins = output.diagnosis_logits.numpy()
    by_label = {label: auroc(margins[:, c], diagnosis[:, c]) for label, c in zip(labels, columns)}
    high = prima.priority_classes.index("high")
    p_high = torch.softmax(output.priority_logits, dim=1)[:, high].numpy()
    probabilities = torch.sigmoid(output.diagnosis_logits).numpy()[:, columns]
    values = [v for v in by_label.values() if v is not None]
    return {
        "auroc_by_label": {k: (None if v is None else round(v, 4)) for k, v in by_label.items()},
        "auroc_min": round(min(values), 4) if values else None,
        "priority_auroc": auroc(p_high, priority == high),
        "calibration_error": expected_calibration_error(probabilities, diagnosis[:, columns]),
        "n_held_out": int(len(embeddings)),
    }


def train_on_phantoms(
    work_dir: Path,
    plan: PhantomTrainingPlan = PhantomTrainingPlan(),
    console: Console | None = None,
    sink: MetricsSink = discard_metrics,
    should_stop: Callable[[str, int], bool] | None = None,
    table: TriageTable | None = None,
) -> PhantomTrainingResult:
    """Train the tiny model on phantoms under ``work_dir`` (corpus cache in ``phantoms/``, checkpoints in
    ``checkpoints/``); resumes from those checkpoints. Each stage's checkpoint is named by a digest of everything
    its result depends on, so changing, say, the heads' settings reuses the finished VQ-VAE and CLIP stages.
    ``should_stop(stage, step)`` interrupts a stage (see :class:`train.checkpoint.TrainingInterrupted`)."""
    work_dir = Path(work_dir)
    table = table or load_triage_table()
    checkpoints = work_dir / "checkpoints"
    seconds: dict[str, float] = {}
    stop = (lambda stage: (lambda step: should_stop(stage, step))) if should_stop else (lambda stage: None)

    started = time.perf_counter()
    lesions = lesions_in_corpus()
    corpus = build_phantom_corpus(work_dir / "phantoms",
                                  phantom_plan(lesions, plan.per_lesion, plan.first_phantom_seed), console)
    seconds["phantoms"] = time.perf_counter() - started
    train_rows, validation_rows, held_out_rows = split_rows(plan, len(lesions))
    vqvae_key = _digest(code_fingerprint(), plan.seed, plan.first_phantom_seed, plan.per_lesion,
                        plan.held_out_per_lesion, plan.vqvae_patches_per_series, asdict(plan.vqvae))
    clip_key = _digest(vqvae_key, plan.validation_per_lesion, asdict(plan.clip))
    heads_key = _digest(clip_key, asdict(plan.heads), table.to_manifest())

    started = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(plan.seed)
        vqvae = build_vqvae("tiny")
        prima = PrimaModel(PRIMA_CONFIGS["tiny"])
    patches = vqvae_training_patches(
        [(s.patches, s.thin_axis) for i in train_rows for s in corpus[i].series],
        plan.vqvae_patches_per_series, plan.seed,
    )
    train_vqvae(vqvae, patches, plan.vqvae, checkpoints / f"vqvae-{vqvae_key}.pt", console, sink, stop("vqvae"))
    seconds["vqvae"] = time.perf_counter() - started

    # Tokens of every study through the trained VQ-VAE: needed for CLIP and the embeddings, skipped when both
    # are already on disk.
    clip_checkpoint = checkpoints / f"clip-{clip_key}.pt"
    embeddings_file = checkpoints / f"embeddings-{clip_key}.pt"
    finished = load_checkpoint(clip_checkpoint)
    reuse = embeddings_file.exists() and finished is not None and finished.step >= plan.clip.steps
    started = time.perf_counter()
    if reuse:
        studies = [TrainingStudy(c.key, [], c.report, c.key, frozenset(c.labels)) for c in corpus]
    else:
        studies = [training_study(c, vqvae) for c in corpus]
    seconds["tokens"] = time.perf_counter() - started

    started = time.perf_counter()
    train_clip(prima.visual, [studies[i] for i in train_rows + validation_rows], STUDY_DESCRIPTION, plan.clip,
               clip_checkpoint, console, sink, stop("clip"))
    seconds["clip"] = time.perf_counter() - started

    started = time.perf_counter()
    if reuse:
        embeddings = torch.load(embeddings_file, weights_only=True)
    else:
        embeddings = study_embeddings(prima.visual, studies, STUDY_DESCRIPTION)
        torch.save(embeddings, embeddings_file)
    diagnosis = np.stack([c.label_vector(prima.diagnosis_names) for c in corpus])
    priority, referral = table.targets(diagnosis, prima.diagnosis_names)
    data = HeadData(embeddings, diagnosis, priority, referral)
    report = train_heads(prima, data.subset(np.array(train_rows)), data.subset(np.array(validation_rows)),
                         plan.heads, checkpoints / f"heads-{heads_key}.pt", console, sink, stop("heads"))
    seconds["heads"] = time.perf_counter() - started

    metrics = evaluate_held_out(prima, embeddings[torch.as_tensor(held_out_rows)], diagnosis[held_out_rows],
                                priority[held_out_rows])
    metrics.update(n_train=len(train_rows), n_validation=len(validation_rows), n_studies=len(corpus),
                   validation_auroc=report.validation_auroc, thresholds_from="validation (Youden's J)")
    sink("evaluation", 0, {k: v for k, v in metrics.items() if isinstance(v, float)})
    prima.eval()
    vqvae.eval()
    return PhantomTrainingResult(vqvae, prima, metrics, table, plan, seconds)


def result_manifest_meta(result: PhantomTrainingResult, version: str, provenance: str) -> dict:
    """The ``meta`` for :func:`models.bundle.save_bundle`: provenance, metrics, table, backbone identity."""
    return {
        "version": version,
        "notes": provenance,
        "provenance": provenance,
        "clinical_use": "none: trained on synthetic phantoms, not for clinical use",
        "backbone_id": result.backbone_id,
        "triage_table": result.table.to_manifest(),
        "training": {
            "data": "synthetic phantom studies (train.phantoms, fast mode)",
            "plan": asdict(result.plan),
            "held_out_metrics": result.metrics,
            "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }
