"""Checkpoints of a training loop: written atomically, read back without running pickled code.

A checkpoint holds the step reached, the state dicts of the models and optimisers and a small JSON-able
``extra`` (losses so far, the loop's own bookkeeping). The loops draw every random number from generators seeded
by ``(seed, step)`` (:func:`step_generator`), so a resumed run needs no saved RNG state to follow exactly the
path an uninterrupted run would have taken.
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class TrainingInterrupted(Exception):
    """Raised by a loop whose ``should_stop`` callback said stop; the latest checkpoint holds its progress."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"training stopped at step {step}; resume from {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class Checkpoint:
    step: int
    models: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


def step_generator(seed: int, *parts: int | str) -> torch.Generator:
    """A torch generator that depends only on ``seed`` and ``parts`` (e.g. the step): resumable randomness."""
    key = zlib.crc32(json.dumps([seed, *parts]).encode())
    return torch.Generator().manual_seed(key)


def save_checkpoint(
    path: Path,
    step: int,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``path`` atomically (a temporary file renamed over it): a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "models": {name: model.state_dict() for name, model in models.items()},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "extra_json": json.dumps(dict(extra or {})),
    }
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    return path


def load_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at ``path``, or None when there is none. Loaded with ``weights_only=True``."""
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return Checkpoint(
        step=int(payload["step"]),
        models=payload["models"],
        optimizers=payload["optimizers"],
        extra=json.loads(payload["extra_json"]),
    )


def restore(
    checkpoint: Checkpoint,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
) -> None:
    for name, model in models.items():
        model.load_state_dict(checkpoint.models[name])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(checkpoint.optimizers[name])
