"""Fairness statistics on the committed synthetic cohort: both planted effects found, nothing else.

Each figure the analysis reports is checked against an independent computation made here from the CSV with the
csv module, numpy and scipy, not with the analysis code.
"""
from __future__ import annotations

import csv
from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import pytest
from scipy import stats

from train.fairness.analysis import analyse, select, turnaround_odds
from train.fairness.cohort import load_cohort_csv
from train.fairness.make_cohort import DEFAULT_OUT, make_cohort, write_cohort
from train.fairness.statistics import benjamini_hochberg, holm, odds_ratio
from worker.commands.train_settings import fairness_config
from worker.config import load_settings

#: The analysis's parameters as the default configuration gives them.
DEFAULT_FAIRNESS = fairness_config(load_settings(environ={}).fairness)

COHORT = DEFAULT_OUT
DAY = 86400.0


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    with COHORT.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def results():
    return analyse(load_cohort_csv(COHORT), DEFAULT_FAIRNESS)


def waited_days(row: dict[str, str]) -> float:
    return (datetime.fromisoformat(row["reported_at"]) - datetime.fromisoformat(row["exam_at"])).total_seconds() / DAY


def test_committed_cohort_is_what_its_seeded_generator_writes(rows):
    regenerated = make_cohort()
    assert len(rows) == len(regenerated) == 6000
    assert rows[:50] == regenerated[:50] and rows[-50:] == regenerated[-50:]


def test_planted_threefold_odds_of_a_seven_day_wait_is_found(rows, results):
    north = [r for r in rows if r["region"] == "north"]
    sizes = {region: sum(r["region"] == region for r in rows) for region in ("east", "south", "west")}
    reference = max(sizes, key=sizes.get)  # the largest known region is the default reference
    ref = [r for r in rows if r["region"] == reference]
    a, b = sum(waited_days(r) > 7 for r in north), sum(waited_days(r) <= 7 for r in north)
    c, d = sum(waited_days(r) > 7 for r in ref), sum(waited_days(r) <= 7 for r in ref)
    expected_or, expected_p = stats.fisher_exact([[a, b], [c, d]])

    found, = select(results.odds, threshold_days=7.0, attribute="region", group_value="north")

    assert found.reference_value == reference
    assert (found.n_group_long, found.n_group, found.n_reference_long, found.n_reference) == (a, a + b, c, c + d)
    assert found.odds_ratio == pytest.approx(expected_or, rel=1e-12)
    assert found.p_value == pytest.approx(expected_p, rel=1e-9)
    assert found.p_value < 0.05 and found.p_adjusted < 0.05 and found.significant
    assert found.ci_low < 3.0 < found.ci_high  # the planted odds ratio lies inside the 95 % interval


def test_planted_tpr_deficit_in_the_oldest_patients_is_found(rows, results):
    diagnoses = [name[2:] for name in rows[0] if name.startswith("p_")]
    positives = [(r, r["truth"]) for r in rows if r["truth"]]
    hit = np.array([float(r[f"p_{truth}"]) >= float(r["threshold"]) for r, truth in positives])
    old = np.array([r["age_band"] == "80+" for r, _ in positives])
    truth = np.array([truth for _, truth in positives])
    # Diagnosis-matched population TPR for the group: each diagnosis's TPR, weighted by the group's mix.
    tpr_by_diagnosis = {name: hit[truth == name].mean() for name in diagnoses}
    matched = np.mean([tpr_by_diagnosis[t] for t in truth[old]])

    found, = select(results.disparities, metric="tpr", diagnosis="all", attribute="age_band", group_value="80+")

    assert found.n_group == old.sum() and found.group_rate == pytest.approx(hit[old].mean())
    assert hit[~old].mean() - hit[old].mean() == pytest.approx(0.2, abs=0.06)  # the planted gap, as sampled
    assert found.population_rate == pytest.approx(matched)
    assert found.disparity == pytest.approx(hit[old].mean() - matched, abs=0.03)  # bootstrap mean ~ its target
    assert len(found.bootstrap_group) == len(found.bootstrap_population) == 20
    mwu = stats.mannwhitneyu(found.bootstrap_group, found.bootstrap_population, alternative="less")
    assert found.p_value == pytest.approx(mwu.pvalue)
    exact = stats.fisher_exact([[hit[old].sum(), (~hit[old]).sum()], [hit[~old].sum(), (~hit[~old]).sum()]],
                               alternative="less")
    assert found.exact_p_value == pytest.approx(exact.pvalue)
    assert found.p_value < 0.05 and found.p_adjusted < 0.05 and found.exact_p_adjusted < 0.05 and found.flagged


def test_no_effect_is_found_where_none_was_planted(results):
    odds, disparities = results.findings()
    assert odds and disparities
    # Every significant long-turnaround finding is the north region or an intersection containing it ...
    assert all("region" in o.attribute and "north" in o.group_value.split("&") for o in odds)
    # ... and every flagged disparity is a TPR deficit of the 80+ band or a subgroup of it; no FPR effect at all.
    assert all(d.metric == "tpr" and "80+" in d.group_value.split("&") and d.disparity < 0 for d in disparities)
    untouched = [o for o in results.odds if o.attribute in ("sex", "age_band", "ethnic_group", "density_quartile",
                                                            "scheduling", "scanner_manufacturer", "scanner_model",
                                                            "insurance_class")]
    assert untouched and not any(o.significant for o in untouched)


def test_groups_below_the_minimum_size_are_listed_but_not_tested(results):
    other_sex, = select(results.odds, threshold_days=7.0, attribute="sex", group_value="O")
    assert other_sex.n_group < 30 and other_sex.p_value is None and not other_sex.significant
    assert "fewer than 30 studies" in other_sex.note


def test_unreported_studies_count_as_long_once_the_threshold_has_passed(tmp_path):
    rows = make_cohort(studies=200, seed=3)
    as_of = datetime.fromisoformat("2026-01-31T12:00:00+00:00")
    for i, row in enumerate(rows):
        row["sex"] = "F" if i < 100 else "M"
        exam = as_of - timedelta(days=20)
        row["exam_at"], row["reported_at"] = exam.isoformat(), (exam + timedelta(hours=12)).isoformat()
    for row, days in zip(rows[:3], (10, 5, 1)):  # three women still waiting, examined 10, 5 and 1 days ago
        row["exam_at"], row["reported_at"] = (as_of - timedelta(days=days)).isoformat(), ""
    write_cohort(rows, tmp_path / "cohort.csv")
    cohort = load_cohort_csv(tmp_path / "cohort.csv", as_of=as_of.timestamp())

    odds = turnaround_odds(cohort, replace(DEFAULT_FAIRNESS, attributes=("sex",), intersections=(),
                                           min_group_size=10))

    women = {o.threshold_days: o for o in odds if o.group_value == "F"}
    assert {t: (o.n_group_long, o.n_group) for t, o in women.items()} == {3.0: (2, 99), 7.0: (1, 98)}
    assert all(o.reference_value == "M" and o.n_reference_long == 0 for o in women.values())


def test_holm_and_benjamini_hochberg_against_hand_and_scipy():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, made monotone.
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert benjamini_hochberg(p) == pytest.approx(stats.false_discovery_control(p, method="bh"))


def test_odds_ratio_matches_scipy_and_survives_a_zero_cell():
    result = odds_ratio(12, 40, 5, 60)
    expected_or, expected_p = stats.fisher_exact([[12, 28], [5, 55]])
    assert (result.odds_ratio, result.p_value) == pytest.approx((expected_or, expected_p))
    assert result.ci_low < result.odds_ratio < result.ci_high
    zero = odds_ratio(0, 40, 5, 60)
    # Haldane-Anscombe: a finite interval, and one that spans 1 as the non-significant p says it should.
    assert zero.odds_ratio == 0 and 0 < zero.ci_low < 1 < zero.ci_high < 10 and zero.p_value > 0.05


def test_bootstrap_is_reproducible_and_does_not_depend_on_which_comparisons_run():
    cohort = load_cohort_csv(COHORT)
    everything = analyse(cohort, DEFAULT_FAIRNESS)
    only_age = analyse(cohort, replace(DEFAULT_FAIRNESS, attributes=("age_band",), intersections=()))
    a, = select(everything.disparities, metric="tpr", diagnosis="all", attribute="age_band", group_value="80+")
    b, = select(only_age.disparities, metric="tpr", diagnosis="all", attribute="age_band", group_value="80+")
    assert a.bootstrap_group == b.bootstrap_group and a.disparity == b.disparity
