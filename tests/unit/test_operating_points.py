"""Operating points a site chooses (train.operating_points): labelled studies move a label's threshold to the
configured sensitivity, measured on held-out studies with its confidence interval; the gate refuses thresholds
that do not deliver it."""
from __future__ import annotations

import numpy as np
import pytest

from train.operating_points import (
    OperatingPointConfig,
    choose_operating_points,
    operating_point_gate,
    roc_curve,
)


def labelled(n: int, seed: int, shift: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of one label for ``n`` studies (positives higher by ``shift``), their truth, and a sex group."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.4
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + shift * truth - 1.0)))
    return scores[:, None], truth[:, None].astype(np.float64), np.where(rng.random(n) < 0.5, "F", "M")


def test_labelled_studies_move_the_threshold_to_reach_the_configured_sensitivity_on_held_out_studies():
    v_scores, v_truth, _ = labelled(400, seed=1)
    h_scores, h_truth, sex = labelled(400, seed=2)
    config = OperatingPointConfig(target="sensitivity", value=0.9, bootstrap=200)

    points = choose_operating_points(["chest_mass"], v_scores, v_truth, h_scores, h_truth, config, {"sex": sex})

    point = points["chest_mass"]
    assert point["threshold"] < 0.5  # the model's 0.5 calls too few: the threshold moved down to reach 90 %
    assert _sensitivity(h_scores[:, 0], h_truth[:, 0], 0.5) < 0.85
    held_out = point["held_out"]
    low, high = held_out["sensitivity_ci"]
    assert low <= held_out["sensitivity"] <= high and low <= 0.9 <= high  # the interval says it is reached
    assert 0.85 <= held_out["sensitivity"] and held_out["specificity"] > 0.3
    assert set(point["by_group"]) == {"sex=F", "sex=M"}  # the fairness report shows it per group
    assert operating_point_gate(points, config)["passed"]


def test_the_gate_refuses_a_threshold_whose_held_out_sensitivity_falls_short():
    v_scores, v_truth, _ = labelled(400, seed=1, shift=4.0)  # validation: well separated
    h_scores, h_truth, _ = labelled(400, seed=2, shift=0.3)  # held out: the model barely separates them
    config = OperatingPointConfig(target="sensitivity", value=0.95, bootstrap=200)
    points = choose_operating_points(["chest_mass"], v_scores, v_truth, h_scores, h_truth, config)
    verdict = operating_point_gate(points, config)
    assert not verdict["passed"] and "chest_mass" in verdict["reason"]


def test_a_label_with_too_few_positives_keeps_its_threshold_and_says_why():
    v_scores, v_truth, _ = labelled(40, seed=3)
    v_truth[:, 0] = 0.0
    v_truth[:2, 0] = 1.0
    points = choose_operating_points(["chest_mass"], v_scores, v_truth, v_scores, v_truth,
                                     OperatingPointConfig(bootstrap=20))
    assert "skipped" in points["chest_mass"] and "2 positive" in points["chest_mass"]["skipped"]


def test_a_specificity_target_and_a_bad_configuration():
    v_scores, v_truth, _ = labelled(300, seed=4)
    config = OperatingPointConfig(target="specificity", value=0.9, bootstrap=50)
    point = choose_operating_points(["x"], v_scores, v_truth, v_scores, v_truth, config)["x"]
    assert point["held_out"]["specificity"] >= 0.9
    _, sensitivity, specificity = roc_curve(v_scores[:, 0], v_truth[:, 0] > 0.5)
    assert np.all(np.diff(sensitivity) >= 0) and np.all(np.diff(specificity) <= 0)
    with pytest.raises(ValueError, match="target 'ppv'"):
        OperatingPointConfig.from_mapping({"target": "ppv", "value": 0.9})
    with pytest.raises(ValueError, match="unknown keys"):
        OperatingPointConfig.from_mapping({"target": "sensitivity", "valeu": 0.9})
    assert OperatingPointConfig.from_mapping({}) is None


def _sensitivity(scores: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    return float((scores[truth > 0.5] >= threshold).mean())
