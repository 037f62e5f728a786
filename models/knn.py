"""k-nearest-neighbour classification and regression over embedding neighbours.

MedImageInsight's paper classifies by the k = 20 most similar training images with similarity-weighted votes.
Here a neighbour's vote for a label is its similarity (negative similarities count as 0), and a label's score is
the weighted fraction of voting neighbours that carry it::

    score(label) = sum_j w_j * y_j(label) / sum_j w_j,   w_j = max(similarity_j, 0)

so scores lie in 0..1, rank studies by how strongly similar studies carry a label (usable for ROC curves and
thresholds) and do not depend on how many labels a neighbour has. Regression is the same weighted mean of the
neighbours' values. Neighbours without ground truth (no final report yet) are left out of the votes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_K = 20


@dataclass(frozen=True)
class Neighbour:
    key: str  # e.g. a study instance UID
    similarity: float
    labels: frozenset[str] | None  # None: no ground truth


def weights(similarities: np.ndarray) -> np.ndarray:
    """Vote weights from similarities: max(s, 0); a row whose weights are all 0 votes uniformly."""
    w = np.clip(np.nan_to_num(np.asarray(similarities, np.float64), neginf=0.0), 0.0, None)
    flat = w.sum(axis=-1, keepdims=True) <= 0
    return np.where(flat, 1.0, w)


def knn_classify(similarities: np.ndarray, neighbour_labels: np.ndarray, k: int = DEFAULT_K,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Scores (n_queries, n_labels) from the similarities (n_queries, >=k) of each query's neighbours, most
    similar first, and their 0/1 labels (n_queries, >=k, n_labels). ``valid`` (n_queries, >=k) marks
    neighbours with ground truth; a query with none gets NaN scores."""
    sims = np.asarray(similarities, np.float64)[:, :k]
    labels = np.asarray(neighbour_labels, np.float64)[:, :k]
    w = weights(sims)
    if valid is not None:
        w = w * np.asarray(valid, bool)[:, :k]
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("qk,qkl->ql", w, labels) / total[:, None]


def knn_regress(similarities: np.ndarray, neighbour_values: np.ndarray, k: int = DEFAULT_K,
                valid: np.ndarray | None = None) -> np.ndarray:
    """Similarity-weighted mean of the neighbours' values (n_queries,), NaN where no neighbour has a value."""
    values = np.asarray(neighbour_values, np.float64)[:, :k]
    ok = np.isfinite(values) if valid is None else (np.asarray(valid, bool)[:, :k] & np.isfinite(values))
    w = weights(np.asarray(similarities, np.float64)[:, :k]) * ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, w * np.nan_to_num(values), 0.0).sum(axis=1) / w.sum(axis=1)


def label_scores(neighbours: Sequence[Neighbour], label_names: Sequence[str] | None = None,
                 k: int = DEFAULT_K) -> dict[str, float]:
    """One query's label scores from its neighbours (most similar first); labels default to those the voting
    neighbours carry. Empty when no neighbour has ground truth."""
    voting = [n for n in list(neighbours)[:k] if n.labels is not None]
    if not voting:
        return {}
    names = sorted(set().union(*(n.labels for n in voting))) if label_names is None else list(label_names)
    if not names:
        return {}
    sims = np.array([[n.similarity for n in voting]])
    onehot = np.array([[[1.0 if name in n.labels else 0.0 for name in names] for n in voting]])
    scores = knn_classify(sims, onehot, k=len(voting))[0]
    return {name: float(s) for name, s in zip(names, scores)}


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half): how well kNN scores rank positives first."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    pos, neg = scores[truth], scores[~truth]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
