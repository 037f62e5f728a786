"""Training the patch tokenizer (VQ-VAE): L1 reconstruction of patches under random axis permutations.

Prima trains its VQ-VAE on 4 x 32 x 32 patches of every orientation; each patch goes in with its thin axis
repeated to 8 slices, so an axial patch is (8, 32, 32), a coronal one (32, 8, 32), a sagittal one (32, 32, 8).
Each step takes a batch of patches and permutes its three spatial axes at random (one permutation per batch,
so the batch keeps one shape), which shows the network every orientation even when the training studies are all
axial, as the phantoms are. The loss is the mean absolute reconstruction error plus the quantiser's loss (its
codebook follows the encoder by exponential moving averages).

Every random choice derives from (seed, step), and the loop checkpoints every ``checkpoint_every`` steps, so an
interrupted run resumed from its checkpoint ends with the same weights as one that was never interrupted.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import VQVAE
from rich.console import Console

from models.tokenizer import vqvae_input
from train.checkpoint import TrainingInterrupted, load_checkpoint, restore, save_checkpoint, step_generator
from train.progress import MetricsSink, discard_metrics, monitor

log = logging.getLogger(__name__)

AXIS_PERMUTATIONS: tuple[tuple[int, int, int], ...] = tuple(itertools.permutations((0, 1, 2)))


@dataclass(frozen=True)
class VQVAETrainingConfig:
    steps: int = 120
    batch_size: int = 16
    learning_rate: float = 2e-3
    seed: int = 0
    checkpoint_every: int = 40
    log_every: int = 10


def vqvae_training_patches(
    series_patches: Sequence[tuple[np.ndarray, int]], per_series: int, seed: int
) -> torch.Tensor:
    """(N, 1, 8, 32, 32) VQ-VAE inputs: up to ``per_series`` distinct patches of each (patches, thin axis),
    sampled reproducibly and turned so that the repeated thin axis comes first (the permutation in training
    then makes every orientation)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for patches, thin_axis in series_patches:
        pick = rng.choice(len(patches), size=min(per_series, len(patches)), replace=False)
        batch = vqvae_input(torch.from_numpy(np.asarray(patches[np.sort(pick)], dtype=np.float32)), thin_axis)
        if thin_axis != 0:  # bring the thin axis to the front: (N, 1, 8, 32, 32)
            batch = batch.movedim(2 + thin_axis, 2)
        chosen.append(batch)
    return torch.cat(chosen)


def permute_axes(batch: torch.Tensor, permutation: Sequence[int]) -> torch.Tensor:
    """(N, 1, a, b, c) -> the same patches with their spatial axes in ``permutation`` order."""
    return batch.permute(0, 1, *(2 + p for p in permutation)).contiguous()


def train_vqvae(
    vqvae: VQVAE,
    patches: torch.Tensor,
    config: VQVAETrainingConfig = VQVAETrainingConfig(),
    checkpoint_path: Path | None = None,
    console: Console | None = None,
    sink: MetricsSink = discard_metrics,
    should_stop: Callable[[int], bool] | None = None,
) -> dict[str, float]:
    """Train ``vqvae`` in place on ``patches`` ((N, 1, 8, 32, 32), thin axis first); returns the final metrics.

    With ``checkpoint_path`` the loop resumes from it when it exists. ``should_stop(step)`` returning True saves a
    checkpoint and raises :class:`TrainingInterrupted` (a scheduler's stop, or a test's simulated crash).
    """
    optimizer = torch.optim.Adam(vqvae.parameters(), lr=config.learning_rate)
    start = 0
    history: dict[str, float] = {}
    if checkpoint_path is not None and (checkpoint := load_checkpoint(checkpoint_path)) is not None:
        restore(checkpoint, {"vqvae": vqvae}, {"adam": optimizer})
        start, history = checkpoint.step, checkpoint.extra.get("history", {})
        log.info("VQ-VAE training resumes at step %d from %s", start, checkpoint_path)
    vqvae.train()
    running = []
    with monitor(console, "vqvae", "VQ-VAE (L1 reconstruction)", config.steps, start, sink) as progress:
        for step in range(start, config.steps):
            if should_stop is not None and should_stop(step):
                if checkpoint_path is not None:
                    save_checkpoint(checkpoint_path, step, {"vqvae": vqvae}, {"adam": optimizer},
                                    {"history": history})
                raise TrainingInterrupted(step, checkpoint_path)
            generator = step_generator(config.seed, "vqvae", step)
            rows = torch.randint(len(patches), (config.batch_size,), generator=generator)
            permutation = AXIS_PERMUTATIONS[int(torch.randint(len(AXIS_PERMUTATIONS), (1,), generator=generator))]
            batch = permute_axes(patches[rows], permutation)
            reconstruction, quantisation_loss = vqvae(batch)
            l1 = (reconstruction - batch).abs().mean()
            loss = l1 + quantisation_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running.append(l1.item())
            history = {"l1": float(np.mean(running[-config.log_every:])), "quantisation": quantisation_loss.item()}
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                progress.metrics(step + 1, history)
            progress.advance(status=f"L1 {history['l1']:.4f}")
            if checkpoint_path is not None and (step + 1) % config.checkpoint_every == 0:
                save_checkpoint(checkpoint_path, step + 1, {"vqvae": vqvae}, {"adam": optimizer},
                                {"history": history})
    vqvae.eval()
    return history


@torch.inference_mode()
def encode_series_latents(vqvae: VQVAE, patches: np.ndarray, thin_axis: int, chunk: int = 512) -> torch.Tensor:
    """(U, *patch_shape) kept patches of one series -> (U, 2, ...) pre-quantisation latents (as the worker)."""
    from models.vqvae import encode_patches

    vqvae.eval()
    tensor = torch.from_numpy(np.asarray(patches, dtype=np.float32))
    parts = [encode_patches(vqvae, vqvae_input(tensor[i : i + chunk], thin_axis)) for i in range(0, len(tensor), chunk)]
    return torch.cat(parts)
