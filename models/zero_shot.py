"""Zero-shot findings from text prompts, for any CLIP-style image/text pair (Prima, MedImageInsight).

A prompt table (data: ``models/prompts/*.json``, or a site's own file) lists for each finding label several
prompts and, once, the prompts of "no finding". Each label's text embedding is the mean of its prompts' unit
embeddings, renormalised (prompt ensembling, as CLIP does). A study's score for a label is the two-way softmax of
its scaled cosine similarities to the label and to "no finding"::

    score(label) = sigmoid(scale * (cos(image, label) - cos(image, no finding)))

so each label is judged on its own (several findings can be present), 0.5 means "as close to the finding as to
no finding", and the ranking of labels follows their similarity. Text embeddings depend only on the model's
weights and the table, so they are computed once per (weights sha256, table hash) and kept in a
:class:`TextEmbeddingCache` on disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPTS_DIR = Path(__file__).parent / "prompts"
NO_FINDING = "no_finding"


class PromptTableError(ValueError):
    """A prompt table that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class PromptTable:
    name: str
    labels: Mapping[str, tuple[str, ...]]  # finding label -> its prompts
    no_finding: tuple[str, ...]

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.labels)

    def digest(self) -> str:
        """sha256 of the table's content (labels, prompts, order): the cache key's text half."""
        canonical = json.dumps({"labels": {k: list(v) for k, v in self.labels.items()},
                                "no_finding": list(self.no_finding)}, sort_keys=False, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def texts(self) -> list[str]:
        """Every prompt once, "no finding" first, in table order (the rows the text tower embeds)."""
        seen: dict[str, None] = dict.fromkeys(self.no_finding)
        for prompts in self.labels.values():
            seen.update(dict.fromkeys(prompts))
        return list(seen)

    @classmethod
    def from_mapping(cls, data: Mapping, name: str = "prompts") -> PromptTable:
        labels = data.get("labels")
        no_finding = data.get(NO_FINDING)
        if not isinstance(labels, Mapping) or not labels:
            raise PromptTableError(f"{name}: 'labels' must map each finding label to a list of prompts")
        if not (isinstance(no_finding, list) and no_finding and all(isinstance(p, str) and p.strip()
                                                                      for p in no_finding)):
            raise PromptTableError(f"{name}: '{NO_FINDING}' must be a non-empty list of prompts")
        table: dict[str, tuple[str, ...]] = {}
        for label, prompts in labels.items():
            if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p.strip()
                                                                    for p in prompts)):
                raise PromptTableError(f"{name}: label {label!r} needs a non-empty list of non-empty prompts")
            table[str(label)] = tuple(prompts)
        return cls(str(data.get("name", name)), table, tuple(no_finding))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PromptTable:
        """A table from a JSON file, or by name from ``models/prompts`` (e.g. ``"prima_diagnoses"``)."""
        path = Path(path)
        if not path.suffix and not path.exists():
            path = PROMPTS_DIR / f"{path}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PromptTableError(f"{path}: cannot read the prompt table: {exc}") from exc
        return cls.from_mapping(data, str(path))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class ClassEmbeddings:
    """The table's label embeddings (n_labels, d) and the "no finding" embedding (d,), all unit vectors."""

    labels: tuple[str, ...]
    matrix: np.ndarray
    no_finding: np.ndarray

    def scores(self, image: np.ndarray, scale: float) -> dict[str, float]:
        """Per label, sigmoid(scale * (cos(image, label) - cos(image, no finding))) for one image embedding."""
        image = _unit(np.asarray(image, np.float32).reshape(-1))
        margin = (self.matrix @ image - float(self.no_finding @ image)) * float(scale)
        probabilities = 1.0 / (1.0 + np.exp(-np.clip(margin.astype(np.float64), -60, 60)))
        return {label: float(p) for label, p in zip(self.labels, probabilities)}


def class_embeddings(table: PromptTable, embed_texts: Callable[[Sequence[str]], np.ndarray]) -> ClassEmbeddings:
    """Embed every prompt once (``embed_texts`` returns (n, d) vectors) and average them per label."""
    texts = table.texts()
    vectors = _unit(embed_texts(texts))
    if vectors.shape[0] != len(texts):
        raise ValueError(f"the text tower returned {vectors.shape[0]} embeddings for {len(texts)} prompts")
    row = {text: i for i, text in enumerate(texts)}

    def mean(prompts: Sequence[str]) -> np.ndarray:
        return _unit(vectors[[row[p] for p in prompts]].mean(axis=0))

    matrix = np.stack([mean(prompts) for prompts in table.labels.values()])
    return ClassEmbeddings(table.label_names, matrix, mean(table.no_finding))


class TextEmbeddingCache:
    """Class embeddings on disk, one ``.npz`` per (model weights id, prompt table digest).

    ``weights_id`` names the text tower's exact weights (the sha256 of its weights file); a new model version or
    an edited table gets new embeddings, an unchanged one reads the file. ``hits``/``misses`` count look-ups
    (``triage bench embedder`` reports the hit rate).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, ClassEmbeddings] = {}

    @staticmethod
    def key(weights_id: str, table: PromptTable) -> str:
        return hashlib.sha256(f"{weights_id}\n{table.digest()}".encode()).hexdigest()[:32]

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def get(self, weights_id: str, table: PromptTable,
            embed_texts: Callable[[Sequence[str]], np.ndarray]) -> ClassEmbeddings:
        key = self.key(weights_id, table)
        cached = self._memory.get(key) or self._read(key, table)
        if cached is not None:
            self.hits += 1
            self._memory[key] = cached
            return cached
        self.misses += 1
        computed = class_embeddings(table, embed_texts)
        self._write(key, weights_id, table, computed)
        self._memory[key] = computed
        return computed

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.npz"

    def _read(self, key: str, table: PromptTable) -> ClassEmbeddings | None:
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                labels = tuple(str(x) for x in data["labels"])
                if labels != table.label_names:  # a hash collision or a hand-edited file: recompute
                    return None
                return ClassEmbeddings(labels, data["matrix"].astype(np.float32),
                                       data["no_finding"].astype(np.float32))
        except (OSError, KeyError, ValueError):
            return None

    def _write(self, key: str, weights_id: str, table: PromptTable, embeddings: ClassEmbeddings) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            np.savez(out, labels=np.array(embeddings.labels), matrix=embeddings.matrix,
                     no_finding=embeddings.no_finding, weights_id=np.array(weights_id),
                     table=np.array(table.name), digest=np.array(table.digest()))
        os.replace(temporary, self._path(key))  # readers see the whole file or none


def combine_with_knn(zero_shot: Mapping[str, float], knn: Mapping[str, float],
                     knn_weight: float = 0.5) -> dict[str, float]:
    """Per label, ``knn_weight * knn + (1 - knn_weight) * zero_shot`` where labelled neighbours scored the label,
    the zero-shot score alone where they did not (no neighbour with a final report carries or denies it)."""
    if not 0.0 <= knn_weight <= 1.0:
        raise ValueError(f"knn_weight {knn_weight} is not within 0..1")
    out = {}
    for label, z in zero_shot.items():
        k = knn.get(label)
        out[label] = z if k is None or not np.isfinite(k) else knn_weight * float(k) + (1 - knn_weight) * z
    return out
