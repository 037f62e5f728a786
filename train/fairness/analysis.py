"""Every comparison the fairness report makes, as plain result rows (the same rows the database stores).

1. Long radiologist turnaround: for each threshold (default 3 and 7 days) and each group of each attribute (and
   intersection), the odds of waiting longer than the threshold against the attribute's reference group, with
   Fisher's exact test; p-values corrected per threshold. A study still unreported is counted as long once the
   threshold has passed (``Cohort.as_of``) and left out before: waiting is what the analysis is about.
2. Turnaround summaries (median, 90th percentile, mean) of AI turnaround, queue wait and radiologist turnaround.
3. Rate disparities: TPR (equalized opportunity) and FPR (with TPR, equalized odds) of the model's calls against
   the final reports, per diagnosis and pooled over diagnoses, for each group, by the diagnosis-matched bootstrap
   (``statistics.bootstrap_disparity``) with an exact test beside it; p-values corrected per metric.

Groups below the minimum size are listed with a note and not tested, so that nobody reads noise as a finding.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sql.report_schema import UNKNOWN
from train.fairness.cohort import MEASURES, Cohort
from train.fairness.statistics import adjust, bootstrap_disparity, exact_rate_test, odds_ratio

DAY_S = 86400.0
ALL_DIAGNOSES = "all"


@dataclass(frozen=True)
class FairnessConfig:
    """The analysis's parameters (the ``fairness`` section, read by the composition root:
    ``worker.commands.train_settings.fairness_config``)."""

    long_turnaround_days: tuple[float, ...]
    min_group_size: int
    min_group_units: int
    attributes: tuple[str, ...]
    intersections: tuple[tuple[str, ...], ...]
    reference_groups: Mapping[str, str]
    sample_size: int
    iterations: int
    seed: int
    alpha: float
    correction: str
    min_disparity: float

    def attribute_sets(self) -> list[str]:
        """Single attributes, then intersections written "a&b"."""
        return [*self.attributes, *("&".join(names) for names in self.intersections)]

    def parameters(self) -> dict[str, Any]:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(self).items()}


@dataclass
class TurnaroundOdds:
    measure: str
    threshold_days: float
    attribute: str
    group_value: str
    reference_value: str
    n_group: int
    n_group_long: int
    n_reference: int
    n_reference_long: int
    odds_ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    significant: bool = False
    note: str | None = None


@dataclass
class RateDisparity:
    metric: str
    diagnosis: str
    attribute: str
    group_value: str
    n_group: int
    n_population: int
    group_rate: float | None = None
    population_rate: float | None = None
    disparity: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    exact_p_value: float | None = None
    exact_p_adjusted: float | None = None
    flagged: bool = False
    bootstrap_group: list[float] | None = None
    bootstrap_population: list[float] | None = None
    note: str | None = None


@dataclass
class TurnaroundSummary:
    measure: str
    attribute: str
    group_value: str
    n: int
    median_s: float | None
    p90_s: float | None
    mean_s: float | None


@dataclass
class FairnessResults:
    source: str
    n_studies: int
    n_reported: int
    parameters: dict[str, Any]
    odds: list[TurnaroundOdds]
    disparities: list[RateDisparity]
    summaries: list[TurnaroundSummary]
    refresh_id: int | None = None
    finished_at: str | None = None

    def findings(self) -> tuple[list[TurnaroundOdds], list[RateDisparity]]:
        """The significant turnaround odds ratios and the flagged rate disparities."""
        return [o for o in self.odds if o.significant], [d for d in self.disparities if d.flagged]


def reference_group(groups: np.ndarray, attribute: str, config: FairnessConfig) -> str | None:
    """The configured reference group, else the largest known group."""
    if attribute in config.reference_groups:
        return config.reference_groups[attribute]
    values, counts = np.unique(groups[groups != UNKNOWN], return_counts=True)
    known = [(c, v) for v, c in zip(values, counts) if UNKNOWN not in str(v).split("&")]
    return str(max(known, key=lambda cv: (cv[0], cv[1]))[1]) if known else None


def turnaround_odds(cohort: Cohort, config: FairnessConfig, measure: str = "radiologist") -> list[TurnaroundOdds]:
    rows: list[TurnaroundOdds] = []
    duration = cohort.durations[measure]
    waited = cohort.as_of - cohort.exam_at  # for studies not yet reported
    for threshold in config.long_turnaround_days:
        limit = threshold * DAY_S
        long = np.where(np.isnan(duration), waited > limit, duration > limit)
        known = ~np.isnan(duration) | (np.isnan(duration) & (waited > limit))
        family: list[TurnaroundOdds] = []
        for attribute in config.attribute_sets():
            groups = cohort.groups(attribute)[known]
            is_long = long[known]
            reference = reference_group(groups, attribute, config)
            if reference is None:
                continue
            in_reference = groups == reference
            n_ref, n_ref_long = int(in_reference.sum()), int(is_long[in_reference].sum())
            for value in sorted(set(groups) - {reference}, key=str):
                in_group = groups == value
                row = TurnaroundOdds(measure, threshold, attribute, str(value), reference, int(in_group.sum()),
                                     int(is_long[in_group].sum()), n_ref, n_ref_long)
                if row.n_group < config.min_group_size or n_ref < config.min_group_size:
                    row.note = f"not tested: fewer than {config.min_group_size} studies in the group or reference"
                else:
                    result = odds_ratio(row.n_group_long, row.n_group, n_ref_long, n_ref)
                    row.odds_ratio, row.ci_low, row.ci_high = result.odds_ratio, result.ci_low, result.ci_high
                    row.p_value = result.p_value
                family.append(row)
        for row, adjusted in zip(family, adjust([r.p_value for r in family], config.correction)):
            row.p_adjusted = adjusted
            row.significant = adjusted is not None and adjusted < config.alpha
        rows.extend(family)
    return rows


def turnaround_summaries(cohort: Cohort, config: FairnessConfig) -> list[TurnaroundSummary]:
    rows = []
    for measure in MEASURES:
        values = cohort.durations[measure]
        for attribute in ("all", *config.attributes):
            groups = np.full(len(cohort), "all", dtype=object) if attribute == "all" else cohort.groups(attribute)
            for value in sorted(set(groups), key=str):
                selected = values[(groups == value) & ~np.isnan(values)]
                if selected.size == 0:
                    rows.append(TurnaroundSummary(measure, attribute, str(value), 0, None, None, None))
                    continue
                rows.append(TurnaroundSummary(measure, attribute, str(value), int(selected.size),
                                              float(np.median(selected)), float(np.percentile(selected, 90)),
                                              float(selected.mean())))
    return rows


def _units(cohort: Cohort, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(study row, diagnosis column, hit) for every unit: positives for TPR, negatives for FPR."""
    wanted = 1 if metric == "tpr" else 0
    rows, columns = np.nonzero(cohort.truth == wanted)
    return rows, columns, cohort.predicted[rows, columns]


def _rng(config: FairnessConfig, *key: str) -> np.random.Generator:
    # One stream per comparison, from the seed and the comparison's name: results do not depend on the order of
    # the comparisons or on which other ones were run.
    return np.random.default_rng([config.seed, zlib.crc32("\x1f".join(key).encode())])


def rate_disparities(cohort: Cohort, config: FairnessConfig) -> list[RateDisparity]:
    rows: list[RateDisparity] = []
    for metric in ("tpr", "fpr"):
        alternative = "less" if metric == "tpr" else "greater"
        study_rows, columns, hits = _units(cohort, metric)
        family: list[RateDisparity] = []
        diagnosis_sets = [(ALL_DIAGNOSES, np.ones(len(columns), dtype=bool))]
        for index, name in enumerate(cohort.diagnoses):
            selected = columns == index
            if selected.sum() >= config.min_group_units:
                diagnosis_sets.append((name, selected))
        for diagnosis, selected in diagnosis_sets:
            unit_rows, unit_columns, unit_hits = study_rows[selected], columns[selected], hits[selected]
            population_rates = np.array([unit_hits[unit_columns == c].mean() if (unit_columns == c).any() else np.nan
                                         for c in range(len(cohort.diagnoses))])
            for attribute in config.attribute_sets():
                groups = cohort.groups(attribute)[unit_rows]
                for value in sorted(set(groups), key=str):
                    in_group = groups == value
                    row = RateDisparity(metric, diagnosis, attribute, str(value), int(in_group.sum()),
                                        len(unit_hits))
                    group_hits = int(unit_hits[in_group].sum())
                    row.group_rate = group_hits / row.n_group
                    # The population's rate for this group's mix of diagnoses: what the bootstrap compares with.
                    row.population_rate = float(np.mean(population_rates[unit_columns[in_group]]))
                    if row.n_group < config.min_group_units:
                        row.note = f"not tested: fewer than {config.min_group_units} " + \
                            ("positives" if metric == "tpr" else "negatives")
                    elif row.n_group == row.n_population:
                        row.note = "not tested: the group is the whole population"
                    else:
                        result = bootstrap_disparity(
                            unit_hits, unit_columns, in_group, alternative=alternative,
                            sample_size=config.sample_size, iterations=config.iterations,
                            rng=_rng(config, metric, diagnosis, attribute, str(value)))
                        row.disparity, row.p_value = result.disparity, result.p_value
                        row.bootstrap_group = result.group_rates
                        row.bootstrap_population = result.population_rates
                        rest = ~in_group
                        row.exact_p_value = exact_rate_test(group_hits, row.n_group, int(unit_hits[rest].sum()),
                                                            int(rest.sum()), alternative)
                    family.append(row)
        for row, adjusted, exact in zip(family, adjust([r.p_value for r in family], config.correction),
                                        adjust([r.exact_p_value for r in family], config.correction)):
            row.p_adjusted, row.exact_p_adjusted = adjusted, exact
            large = row.disparity is not None and (
                row.disparity <= -config.min_disparity if metric == "tpr" else row.disparity >= config.min_disparity)
            row.flagged = bool(large and adjusted is not None and adjusted < config.alpha
                               and exact is not None and exact < config.alpha)
        rows.extend(family)
    return rows


def analyse(cohort: Cohort, config: FairnessConfig) -> FairnessResults:
    """The whole analysis of one cohort."""
    return FairnessResults(
        source=cohort.source, n_studies=len(cohort), n_reported=int(cohort.reported.sum()),
        parameters={**config.parameters(), "diagnoses": list(cohort.diagnoses), "as_of": cohort.as_of},
        odds=turnaround_odds(cohort, config), disparities=rate_disparities(cohort, config),
        summaries=turnaround_summaries(cohort, config),
    )


def headline(results: FairnessResults) -> dict[str, Any]:
    """A short summary: what was found, for logs and the command line's JSON line."""
    odds, disparities = results.findings()
    return {
        "studies": results.n_studies,
        "reported": results.n_reported,
        "long_turnaround_findings": [
            {"threshold_days": o.threshold_days, "attribute": o.attribute, "group": o.group_value,
             "reference": o.reference_value, "odds_ratio": round(o.odds_ratio, 3), "p_adjusted": o.p_adjusted}
            for o in odds],
        "rate_disparity_findings": [
            {"metric": d.metric, "diagnosis": d.diagnosis, "attribute": d.attribute, "group": d.group_value,
             "disparity": round(d.disparity, 3), "p_adjusted": d.p_adjusted, "exact_p_adjusted": d.exact_p_adjusted}
            for d in disparities],
    }


def select(rows: Sequence, **criteria: Any) -> list:
    """Rows whose attributes equal the given values, e.g. ``select(results.odds, attribute="region")``."""
    return [row for row in rows if all(getattr(row, key) == value for key, value in criteria.items())]
