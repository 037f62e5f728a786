"""The statistics behind the fairness report: odds ratios, multiple testing, and the bootstrap rate disparity.

The disparity follows the seed study's recipe (equalized opportunity for TPR, equalized odds with FPR): in each of
``iterations`` rounds, draw ``sample_size`` units with replacement from the group and as many from the whole
population matched on diagnosis (each drawn group unit is paired with a random population unit of the same
diagnosis), compute the rate in both samples, and compare the two lists of rates with a one-sided Mann-Whitney U
test. A unit is a (study, diagnosis) pair: a positive one for TPR, a negative one for FPR.

That p-value measures the bootstrap, not the data: with more iterations it shrinks for any non-zero difference,
however small the group. So the analysis also reports Fisher's exact test of the group against the rest of the
population on the observed counts, and flags a group only when both are significant after correction and the
disparity is large enough to matter (``min_disparity``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class OddsRatio:
    odds_ratio: float
    ci_low: float
    ci_high: float
    p_value: float


def odds_ratio(exposed_events: int, exposed_total: int, reference_events: int, reference_total: int,
               confidence: float = 0.95) -> OddsRatio:
    """Odds of the event in the exposed group over the reference group, two-sided Fisher exact p-value.

    The point estimate is the sample odds ratio ad/bc (as scipy's ``fisher_exact`` returns it); the confidence
    interval is Woolf's on the log scale, with 0.5 added to every cell when one is zero (Haldane-Anscombe).
    """
    a, b = exposed_events, exposed_total - exposed_events
    c, d = reference_events, reference_total - reference_events
    if min(a, b, c, d) < 0:
        raise ValueError(f"event counts exceed totals: {exposed_events}/{exposed_total}, "
                         f"{reference_events}/{reference_total}")
    estimate, p_value = stats.fisher_exact([[a, b], [c, d]], alternative="two-sided")
    if min(a, b, c, d) == 0:
        a, b, c, d = a + 0.5, b + 0.5, c + 0.5, d + 0.5
    z = stats.norm.ppf(0.5 + confidence / 2)
    log_or, se = math.log(a * d / (b * c)), math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    return OddsRatio(float(estimate), math.exp(log_or - z * se), math.exp(log_or + z * se), float(p_value))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate)."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(ranked, 1.0)
    return adjusted.tolist()


CORRECTIONS = {"holm": holm, "bh": benjamini_hochberg, "none": lambda p: list(map(float, p))}


def adjust(p_values: Sequence[float | None], method: str) -> list[float | None]:
    """Adjust the p-values that exist (untested rows are None and stay None) as one family."""
    if method not in CORRECTIONS:
        raise ValueError(f"unknown multiple-testing correction {method!r}; use one of {sorted(CORRECTIONS)}")
    present = [i for i, p in enumerate(p_values) if p is not None]
    adjusted = CORRECTIONS[method]([p_values[i] for i in present])
    result: list[float | None] = [None] * len(p_values)
    for i, value in zip(present, adjusted):
        result[i] = value
    return result


@dataclass(frozen=True)
class BootstrapDisparity:
    group_rates: list[float]
    population_rates: list[float]
    disparity: float
    p_value: float


def bootstrap_disparity(hits: np.ndarray, diagnoses: np.ndarray, in_group: np.ndarray, *, alternative: str,
                        sample_size: int, iterations: int, rng: np.random.Generator) -> BootstrapDisparity:
    """Group rate against the diagnosis-matched population rate, by the bootstrap described above.

    ``hits``: per unit, whether the model called it positive; ``diagnoses``: per unit, its diagnosis index;
    ``in_group``: per unit, whether it belongs to the group. ``alternative``: "less" (TPR: is the group's rate
    lower?) or "greater" (FPR: is it higher?).
    """
    group_units = np.flatnonzero(in_group)
    if len(group_units) == 0:
        raise ValueError("the group has no units to sample")
    drawn = rng.choice(group_units, size=(iterations, sample_size), replace=True)
    matched = np.empty_like(drawn)
    drawn_diagnoses = diagnoses[drawn]
    for diagnosis in np.unique(drawn_diagnoses):
        population = np.flatnonzero(diagnoses == diagnosis)
        where = drawn_diagnoses == diagnosis
        matched[where] = population[rng.integers(0, len(population), size=int(where.sum()))]
    group_rates = hits[drawn].mean(axis=1)
    population_rates = hits[matched].mean(axis=1)
    if np.all(group_rates == population_rates[0]) and np.all(population_rates == population_rates[0]):
        p_value = 1.0  # identical constant samples: Mann-Whitney U is undefined, and there is nothing to see
    else:
        p_value = float(stats.mannwhitneyu(group_rates, population_rates, alternative=alternative).pvalue)
    return BootstrapDisparity(group_rates.tolist(), population_rates.tolist(),
                              float(group_rates.mean() - population_rates.mean()), p_value)


def exact_rate_test(group_hits: int, group_total: int, rest_hits: int, rest_total: int, alternative: str) -> float:
    """One-sided Fisher exact p-value that the group's rate is lower ("less") or higher ("greater") than the rest's."""
    table = [[group_hits, group_total - group_hits], [rest_hits, rest_total - rest_hits]]
    return float(stats.fisher_exact(table, alternative=alternative)[1])
