"""Slice embeddings: 8-bit pictures -> MedImageInsight image embeddings, per slice, series and study.

A series embedding is the element-wise median of its slices' embeddings, a study embedding the median of its
series embeddings, each L2-normalised again (the median of unit vectors is not one). The median keeps one odd
slice (a scout, a slice full of artefact) from moving the whole series.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.medimageinsight import CONFIGS, MedImageInsight, load_medimageinsight
from models.slice_input import Slice8, model_input, series_slices

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_embedding(vectors: np.ndarray) -> np.ndarray:
    """Element-wise median of (n, d) unit vectors, renormalised to unit length."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or not len(vectors):
        raise ValueError(f"median of {vectors.shape} embeddings: need at least one")
    median = np.median(vectors, axis=0)
    norm = float(np.linalg.norm(median))
    if norm == 0.0:  # opposite vectors cancel: fall back to the mean direction of the first
        median, norm = vectors[0], float(np.linalg.norm(vectors[0]))
    return (median / norm).astype(np.float32)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_slice_model(weights: str | Path | None, config_name: str = "full", device: str = "cpu",
                     precision: str = "fp32", seed: int = 0) -> MedImageInsight:
    """The image/text model from the official weights file; without one, only ``tiny`` may be built from a
    seeded random initialisation (the demo and tests), never ``full`` (random full-size evidence is noise)."""
    if config_name not in CONFIGS:
        raise ValueError(f"slice model config {config_name!r} is not one of {sorted(CONFIGS)}")
    config = CONFIGS[config_name]
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
    if weights:
        model = load_medimageinsight(weights, config, device=device)
    elif config_name == "tiny":
        torch.manual_seed(seed)
        model = MedImageInsight(config).to(device).eval()
    else:
        raise FileNotFoundError("no MedImageInsight weights configured (slice_evidence.weights): the official "
                                "file is never downloaded; set its path, or use config tiny for a demo")
    return model.to(PRECISIONS[precision])


class SliceEmbedder:
    """Holds the model on its device; embeds pictures in batches."""

    def __init__(self, model: MedImageInsight, device: str = "cpu", batch_size: int = 16,
                 image_size: int | None = None) -> None:
        self.model = model.eval()
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.image_size = int(image_size or model.config.image_size)
        self.dtype = next(model.parameters()).dtype

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    def embed_pictures(self, pictures: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 unit vectors of 8-bit pictures."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(pictures), self.batch_size):
                x = model_input(list(pictures[start:start + self.batch_size]), self.image_size)
                x = x.to(self.device, self.dtype, non_blocking=True)
                out.append(self.model.encode_image(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: Sequence[str], tokenizer=None) -> np.ndarray:
        from models.clip_tokenizer import ClipTokenizer

        tokenizer = tokenizer or ClipTokenizer()
        ids, mask = tokenizer(list(texts))
        with torch.inference_mode():
            return self.model.encode_text(ids.to(self.device), mask.to(self.device)).float().cpu().numpy()

    def embed_series(self, paths: list[Path], max_slices: int) -> tuple[np.ndarray | None, list[Slice8],
                                                                         dict[str, str]]:
        """(series embedding or None, the slices used, problems per file) for one series' files."""
        slices, problems = series_slices(paths, max_slices)
        if not slices:
            return None, [], problems
        vectors = self.embed_pictures([s.pixels for s in slices])
        return median_embedding(vectors), slices, problems
