"""Zero-shot findings in the worker: prompt tables against the study's image embedding, text embeddings cached.

* ``slice_knn`` (CR, DX, CT): the MedImageInsight study vector (median of its slice embeddings, the one the kNN
  search uses) is scored against the ``zero_shot.slice_prompts`` table with the MedImageInsight text tower; where
  neighbours with a final report exist, each finding's score is combined with its kNN score
  (:func:`models.zero_shot.combine_with_knn`).
* ``neuro_mri``: Prima's study embedding, projected by the study ViT's head, against ``zero_shot.prima_prompts``
  with Prima's GPT-2 text tower (:mod:`models.prima_text`), reported beside the heads' probabilities.

Text embeddings are computed once per model version: the cache key is the sha256 of the text tower's weights
file (a random tiny model is keyed by its seed) and the table's hash; they live under
``<var_dir>/text_embeddings``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.zero_shot import ClassEmbeddings, PromptTable, TextEmbeddingCache, combine_with_knn
from pacs_bridge.codes import FINDING_CODES
from pacs_bridge.results import Finding, ZeroShotFindings

log = logging.getLogger(__name__)

#: The method the SR names for these findings (TID 4019 Algorithm Name).
SLICE_METHOD = "medimageinsight-zero-shot"
PRIMA_METHOD = "prima-zero-shot"


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_id(path: str | os.PathLike[str] | None, fallback: str) -> str:
    """sha256 of a weights file (hashed once per process and file version), or ``fallback`` without a file."""
    if not path:
        return fallback
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def cache_for(settings) -> TextEmbeddingCache:
    return TextEmbeddingCache(settings.var_dir / "text_embeddings")


@dataclass(frozen=True)
class ZeroShotScores:
    method: str
    table: str
    zero_shot: dict[str, float]  # per label, from the prompts alone
    combined: dict[str, float]  # with the kNN scores where labelled neighbours exist (else = zero_shot)


class SliceZeroShot:
    """MedImageInsight zero-shot scoring of slice_knn studies, for one worker process."""

    def __init__(self, settings, embedder, cache: TextEmbeddingCache | None = None) -> None:
        cfg = settings.zero_shot
        self.settings = settings
        self.embedder = embedder  # models.slice_embedder.SliceEmbedder (image and text towers)
        self.table = PromptTable.load(cfg.slice_prompts)
        self.cache = cache or cache_for(settings)
        evidence_cfg = settings.slice_evidence
        self.weights_id = weights_id(evidence_cfg.weights or None,
                                     f"random-medimageinsight-{evidence_cfg.config}-seed0")
        self.knn_weight = float(cfg.knn_weight)

    def class_embeddings(self) -> ClassEmbeddings:
        return self.cache.get(self.weights_id, self.table, self.embedder.embed_texts)

    def score(self, study_vector: np.ndarray, knn: Mapping[str, float] | None = None) -> ZeroShotScores:
        embeddings = self.class_embeddings()
        zero_shot = embeddings.scores(study_vector, self.embedder.model.scale)
        combined = combine_with_knn(zero_shot, knn or {}, self.knn_weight)
        return ZeroShotScores(SLICE_METHOD, self.table.name, zero_shot, combined)


class PrimaZeroShot:
    """Prima zero-shot scoring of neuro_mri studies from the bundle's CLIP text tower."""

    def __init__(self, settings, prima, text_model, text_weights_id: str,
                 cache: TextEmbeddingCache | None = None, tokenizer=None) -> None:
        from models.gpt2_tokenizer import GPT2Tokenizer

        self.prima, self.text_model = prima, text_model
        self.table = PromptTable.load(settings.zero_shot.prima_prompts)
        self.cache = cache or cache_for(settings)
        self.weights_id = text_weights_id
        self.tokenizer = tokenizer or GPT2Tokenizer()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        ids, lengths = self.tokenizer.batch(list(texts))
        device = next(self.text_model.parameters()).device
        with torch.inference_mode():
            return self.text_model(ids.to(device), lengths.to(device)).float().cpu().numpy()

    def score(self, study_embedding) -> ZeroShotScores:
        import torch

        from models.prima_text import image_embedding

        embeddings = self.cache.get(self.weights_id, self.table, self.embed_texts)
        with torch.inference_mode():
            image = image_embedding(self.prima, torch.as_tensor(study_embedding).reshape(1, -1))[0].cpu().numpy()
        scores = embeddings.scores(image, self.text_model.scale)
        return ZeroShotScores(PRIMA_METHOD, self.table.name, scores, dict(scores))


def zero_shot_findings(scores: ZeroShotScores, threshold: float, top_k: int, codable: Sequence[str] | None = None):
    """The findings to report: the labels at or above ``threshold``, else at least the ``top_k`` best, each a
    :class:`pacs_bridge.results.Finding` with the combined score (labels the SR cannot code are left out)."""
    values = scores.combined
    ranked = sorted((label for label in values if codable is None or label in codable),
                    key=lambda label: (-values[label], label))
    chosen = [label for label in ranked if values[label] >= threshold]
    chosen += [label for label in ranked if label not in chosen][: max(top_k - len(chosen), 0)]
    return tuple(Finding(label=label, probability=min(max(values[label], 0.0), 1.0), threshold=threshold)
                 for label in sorted(chosen, key=lambda name: (-values[name], name)))


# -- the product's call sites: slice_knn and neuro_mri (worker.pipelines) ---------------------
_SLICE: weakref.WeakKeyDictionary[object, SliceZeroShot | None] = weakref.WeakKeyDictionary()
# A LoadedBundle is an unhashable dataclass: keyed by id, with a weak reference that says it is still that bundle.
_PRIMA: dict[int, tuple[weakref.ref, PrimaZeroShot | None]] = {}


def as_findings(scores: ZeroShotScores, version: str, settings, parameters: Sequence[str] = ()):
    """The scores as :class:`pacs_bridge.results.ZeroShotFindings`: the method, the model version, the labels the
    SR reports (``zero_shot.threshold``, topped up to ``model.report_top_k``) and how they were made."""
    findings = zero_shot_findings(scores, float(settings.zero_shot.threshold),
                                  max(int(settings.model.report_top_k), 1), codable=FINDING_CODES)
    return ZeroShotFindings(scores.method, version[:64], findings,
                            (f"prompts={scores.table}"[:64], *parameters))


def slice_zero_shot_for(evidence) -> SliceZeroShot | None:
    """The SliceZeroShot of a worker's SliceEvidence (its embedder's text tower), built once; None when
    ``zero_shot.enabled`` is off or the prompt table cannot be used (said once)."""
    if evidence in _SLICE:
        return _SLICE[evidence]
    scorer = None
    if evidence.settings.zero_shot.enabled:
        try:
            scorer = SliceZeroShot(evidence.settings, evidence.embedder)
        except (ValueError, OSError) as exc:
            log.error("zero-shot findings are off for slice_knn: %s", exc)
    _SLICE[evidence] = scorer
    return scorer


def add_slice_zero_shot(evidence, result, study_vector, neighbours, knn_scores: Mapping[str, float]):
    """``result`` (slice_knn) with the study's zero-shot findings, combined with the kNN scores where neighbours
    with a final report exist (they then score every label: a label none of them carries counts 0); never
    raises: without zero-shot the kNN result goes out alone."""
    import dataclasses

    try:
        scorer = slice_zero_shot_for(evidence)
        if scorer is None or study_vector is None:
            return result
        labelled = any(n.labels is not None for n in neighbours)
        knn = {label: float(knn_scores.get(label, 0.0)) for label in scorer.table.label_names} if labelled else {}
        scores = scorer.score(np.asarray(study_vector, np.float32), knn)
        parameters = (f"knn_weight={scorer.knn_weight!r}",) if labelled else ()
        zero_shot = as_findings(scores, evidence.model_version, evidence.settings, parameters)
    except Exception:  # zero-shot is an addition: the result goes out without it
        log.exception("study %s: no zero-shot findings", result.study_instance_uid)
        return result
    return dataclasses.replace(result, zero_shot=zero_shot)


def prima_zero_shot_for(settings, bundle) -> PrimaZeroShot | None:
    """The PrimaZeroShot of a loaded bundle, built once per bundle; None when the bundle has no text tower or
    ``zero_shot.enabled`` is off."""
    known = _PRIMA.get(id(bundle))
    if known is not None and known[0]() is bundle:
        return known[1]
    scorer = None
    if settings.zero_shot.enabled and getattr(bundle, "text", None) is not None:
        try:
            scorer = PrimaZeroShot(settings, bundle.prima, bundle.text, bundle.text_weights_id)
        except (ValueError, OSError) as exc:
            log.error("zero-shot findings are off for bundle %s: %s", bundle.version, exc)
    for key in [key for key, (ref, _) in _PRIMA.items() if ref() is None]:
        del _PRIMA[key]
    _PRIMA[id(bundle)] = (weakref.ref(bundle), scorer)
    return scorer


def add_prima_zero_shot(settings, bundle, prediction, result):
    """``result`` (neuro_mri) with Prima's zero-shot findings for the study embedding, where the bundle carries a
    text tower; never raises."""
    import dataclasses

    try:
        scorer = prima_zero_shot_for(settings, bundle)
        if scorer is None:
            return result
        scores = scorer.score(prediction.embedding)
        zero_shot = as_findings(scores, bundle.version, settings)
    except Exception:  # zero-shot is an addition: the result goes out without it
        log.exception("study %s: no zero-shot findings", result.study_instance_uid)
        return result
    return dataclasses.replace(result, zero_shot=zero_shot)
