"""Operating points a site chooses: per label, the threshold that reaches a configured sensitivity (or
specificity), picked on one set of labelled studies and checked on another, with bootstrap confidence intervals.

``training.operating_point: {target: sensitivity, value: 0.9}`` asks for thresholds that call at least 90 % of
a label's positives. :func:`choose_operating_points` picks each label's threshold on the validation studies (the
highest threshold whose sensitivity reaches the value, so specificity is as high as that allows), and measures
on the held-out studies the sensitivity and specificity it reaches, each with a percentile bootstrap interval,
the AUROC with its interval, and the same per group (sex, age band, ...) for the fairness report.
:func:`operating_point_gate` refuses a candidate whose held-out interval lies wholly below the target for some
label: the threshold would not deliver what the site asked for. Labels with too few positives or negatives on
either set keep the model's own threshold and say why.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

TARGETS = ("sensitivity", "specificity")


@dataclass(frozen=True)
class OperatingPointConfig:
    target: str = "sensitivity"
    value: float = 0.9
    bootstrap: int = 500
    confidence: float = 0.95
    min_positives: int = 5
    min_negatives: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"training.operating_point.target {self.target!r} is not one of {TARGETS}")
        if not 0.0 < self.value < 1.0:
            raise ValueError(f"training.operating_point.value {self.value} is not within (0, 1)")
        if self.bootstrap < 10 or not 0.5 < self.confidence < 1.0:
            raise ValueError("training.operating_point: bootstrap needs at least 10 resamples and confidence "
                             f"within (0.5, 1); got {self.bootstrap}, {self.confidence}")

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> OperatingPointConfig | None:
        """From ``training.operating_point``; None when it is not set (the model's own thresholds stay)."""
        if not section:
            return None
        fields = cls.__dataclass_fields__
        unknown = set(section) - set(fields)
        if unknown:
            raise ValueError(f"training.operating_point: unknown keys {sorted(unknown)}")
        return cls(**{k: type(getattr(cls(), k))(v) for k, v in section.items()})


def roc_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, sensitivity, specificity) with a call meaning ``score >= threshold``, thresholds descending
    (each distinct score once, the last calling everything)."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    thresholds = np.unique(scores)[::-1]
    called = scores[None, :] >= thresholds[:, None]
    sensitivity = (called & truth).sum(1) / max(int(truth.sum()), 1)
    specificity = (~called & ~truth).sum(1) / max(int((~truth).sum()), 1)
    return thresholds, sensitivity, specificity


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    pos, neg = scores[truth], scores[~truth]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


def threshold_for(scores: np.ndarray, truth: np.ndarray, target: str, value: float) -> float:
    """The highest threshold whose ``target`` (sensitivity) reaches ``value``; for specificity the lowest one."""
    thresholds, sensitivity, specificity = roc_curve(scores, truth)
    if target == "sensitivity":
        return float(thresholds[int(np.argmax(sensitivity >= value))])  # sensitivity rises as thresholds fall
    reaching = np.nonzero(specificity >= value)[0]
    # no threshold among the scores reaches it: call nothing (just above the highest score)
    return float(thresholds[reaching[-1]]) if len(reaching) else float(np.nextafter(thresholds[0], np.inf))


def _rates(scores: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[float, float]:
    called = scores >= threshold
    pos, neg = truth.sum(), (~truth).sum()
    return (float((called & truth).sum() / pos) if pos else float("nan"),
            float((~called & ~truth).sum() / neg) if neg else float("nan"))


def measured(scores: np.ndarray, truth: np.ndarray, threshold: float, config: OperatingPointConfig,
             rng: np.random.Generator) -> dict[str, Any]:
    """Sensitivity, specificity and AUROC at ``threshold`` with percentile bootstrap intervals (resampling
    positives and negatives separately, so every resample has both)."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    pos, neg = np.nonzero(truth)[0], np.nonzero(~truth)[0]
    sensitivity, specificity = _rates(scores, truth, threshold)
    out: dict[str, Any] = {"sensitivity": sensitivity, "specificity": specificity, "auroc": auroc(scores, truth),
                           "n_positive": len(pos), "n_negative": len(neg)}
    if not len(pos) or not len(neg):
        return out
    samples = []
    for _ in range(config.bootstrap):
        rows = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        samples.append((*_rates(scores[rows], truth[rows], threshold), auroc(scores[rows], truth[rows])))
    tail = (1 - config.confidence) / 2 * 100
    low, high = np.percentile(np.array(samples), [tail, 100 - tail], axis=0)
    for i, name in enumerate(("sensitivity", "specificity", "auroc")):
        out[f"{name}_ci"] = [round(float(low[i]), 4), round(float(high[i]), 4)]
    return out


def choose_operating_points(
    names: Sequence[str],
    validation_scores: np.ndarray, validation_truth: np.ndarray,
    held_out_scores: np.ndarray, held_out_truth: np.ndarray,
    config: OperatingPointConfig,
    groups: Mapping[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per label (columns of the score/truth matrices; truth NaN = unknown), the chosen threshold and what it
    reaches on the held-out studies (overall and per group), or ``{"skipped": why}``."""
    rng = np.random.default_rng(config.seed)
    out: dict[str, dict[str, Any]] = {}
    for column, name in enumerate(names):
        v_known = ~np.isnan(validation_truth[:, column])
        h_known = ~np.isnan(held_out_truth[:, column])
        v_truth = validation_truth[v_known, column] > 0.5
        h_truth = held_out_truth[h_known, column] > 0.5
        counts = {"validation": (int(v_truth.sum()), int((~v_truth).sum())),
                  "held_out": (int(h_truth.sum()), int((~h_truth).sum()))}
        short = [f"{where}: {p} positive, {n} negative" for where, (p, n) in counts.items()
                 if p < config.min_positives or n < config.min_negatives]
        if short:
            out[name] = {"skipped": f"too few labelled studies ({'; '.join(short)}; at least "
                                    f"{config.min_positives}/{config.min_negatives} needed)"}
            continue
        threshold = threshold_for(validation_scores[v_known, column], v_truth, config.target, config.value)
        h_scores = held_out_scores[h_known, column]
        point = {"threshold": threshold, "target": config.target, "value": config.value,
                 "held_out": measured(h_scores, h_truth, threshold, config, rng)}
        by_group: dict[str, dict[str, Any]] = {}
        for attribute, values in (groups or {}).items():
            values = np.asarray(values)[h_known]
            for group in sorted({str(v) for v in values}):
                rows = values.astype(str) == group
                sensitivity, specificity = _rates(h_scores[rows], h_truth[rows], threshold)
                by_group[f"{attribute}={group}"] = {
                    "sensitivity": None if np.isnan(sensitivity) else round(sensitivity, 4),
                    "specificity": None if np.isnan(specificity) else round(specificity, 4),
                    "n_positive": int(h_truth[rows].sum()), "n_negative": int((~h_truth[rows]).sum())}
        point["by_group"] = by_group
        out[name] = point
    return out


def operating_point_gate(points: Mapping[str, Mapping[str, Any]], config: OperatingPointConfig
                         ) -> dict[str, Any]:
    """The gate's verdict (as :func:`train.nightly.gate_candidate` writes them): failed when some label's held-out
    confidence interval of the target lies wholly below the configured value."""
    short = {}
    for name, point in points.items():
        interval = point.get("held_out", {}).get(f"{config.target}_ci")
        if interval is not None and interval[1] < config.value:
            short[name] = interval
    chosen = sum(1 for p in points.values() if "threshold" in p)
    reason = (f"{chosen} thresholds reach {config.target} {config.value} within their held-out "
              f"{config.confidence:.0%} intervals" if not short else
              "held-out " + config.target + " below " + str(config.value) + " for "
              + ", ".join(f"{n} {i}" for n, i in sorted(short.items())))
    return {"passed": not short, "value": chosen, "limit": config.value, "reason": reason,
            "config": asdict(config)}
