"""Evaluation measures of the trained heads: AUROC per label, calibration error, thresholds, group disparities.

Written out (a rank formula, a binning) rather than taken from a library so that the numbers in the model registry
are defined here, next to the gates that read them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float | None:
    """Mean |observed rate - mean probability| over equal-width probability bins, weighted by bin size."""
    p, y = np.asarray(probabilities, dtype=float).ravel(), np.asarray(labels, dtype=float).ravel()
    if len(p) == 0:
        return None
    which = np.minimum((p * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.sum() / len(p) * abs(y[inside].mean() - p[inside].mean())
    return float(error)


def youden_threshold(margins: np.ndarray, labels: np.ndarray) -> float | None:
    """The margin cut that maximises sensitivity + specificity - 1, halfway between two observed margins;
    None without both classes."""
    margins, labels = np.asarray(margins, dtype=float), np.asarray(labels) > 0.5
    if labels.all() or not labels.any():
        return None
    values = np.unique(margins)
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    best, best_j = 0.0, -np.inf
    for cut in cuts:
        called = margins > cut
        j = called[labels].mean() - called[~labels].mean()
        if j > best_j + 1e-12:
            best, best_j = float(cut), j
    return best


def aurocs_by_label(scores: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """AUROC of each label with both classes present; ``labels`` may hold NaN for unknown (left out)."""
    result = {}
    for k, name in enumerate(names):
        known = ~np.isnan(labels[:, k])
        value = auroc(scores[known, k], labels[known, k])
        if value is not None:
            result[name] = value
    return result


def worst_group_disparity(
    called: np.ndarray, truth: np.ndarray, groups: Mapping[str, np.ndarray], min_units: int = 5
) -> dict[str, float | str | None]:
    """The largest |group rate - population rate| of TPR and of FPR over every attribute's groups.

    ``called``/``truth``: (N, D) booleans and 0/1/NaN; ``groups``: attribute -> (N,) group values. Units are
    (study, diagnosis) pairs, as in the fairness report; groups with fewer than ``min_units`` units are left out.
    """
    worst: dict[str, float | str | None] = {"tpr": 0.0, "fpr": 0.0, "tpr_group": None, "fpr_group": None}
    for metric, wanted in (("tpr", 1.0), ("fpr", 0.0)):
        rows, columns = np.nonzero(truth == wanted)
        if len(rows) == 0:
            continue
        hits = called[rows, columns].astype(float)
        population = hits.mean()
        for attribute, values in groups.items():
            unit_groups = np.asarray(values, dtype=object)[rows]
            for value in sorted(set(unit_groups), key=str):
                inside = unit_groups == value
                if inside.sum() < min_units or inside.all():
                    continue
                gap = abs(hits[inside].mean() - population)
                if gap > worst[metric]:  # type: ignore[operator]
                    worst[metric], worst[f"{metric}_group"] = float(gap), f"{attribute}={value}"
    return worst
