"""StudyPredictor end to end on synthetic DICOM in the tiny configuration (models.inference)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import random_bundle
from models.inference import NoUsableSeries, StudyPredictor
from models.labels import DIAGNOSIS_NAMES, PRIORITY_CLASSES, REFERRALS
from models.tokenizer import TokenizerConfig
from models.volume import load_study
from tests.support.mr_series import head_slice, write_head_study, write_series


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return write_head_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def predictor() -> StudyPredictor:
    return StudyPredictor(random_bundle("tiny", seed=0), device="cpu")


def test_prediction_from_dicom_files_has_every_label_as_a_probability(predictor, study_files) -> None:
    prediction = predictor.predict_files(study_files)

    assert list(prediction.diagnosis_probs) == list(DIAGNOSIS_NAMES)
    assert all(0.0 <= p <= 1.0 for p in prediction.diagnosis_probs.values())
    assert prediction.thresholds == {name: 0.5 for name in DIAGNOSIS_NAMES}
    assert list(prediction.priority_probs) == list(PRIORITY_CLASSES)
    assert math.isclose(sum(prediction.priority_probs.values()), 1.0, rel_tol=1e-6)
    assert list(prediction.referral_probs) == list(REFERRALS)
    assert prediction.embedding.shape == (predictor.prima.config.embedding_dim,)
    assert prediction.embedding.dtype == np.float32
    assert sorted(prediction.series_used) == sorted(study_files)
    assert all(n > 25 for n in prediction.tokens_per_series.values())
    assert {"load", "tokenize", "vqvae", "vit", "heads", "total"} <= set(prediction.timings_s)
    assert prediction.model_version == "random-tiny-seed0"


def test_batched_studies_get_the_same_predictions_as_one_at_a_time(predictor, study_files) -> None:
    volumes, _ = load_study(study_files)
    smaller = volumes[1:]  # a second study: fewer series, different sequence lengths

    one = predictor.predict(volumes)
    two = predictor.predict(smaller)
    batch = predictor.predict_batch([smaller, volumes])

    assert np.allclose(batch[1].embedding, one.embedding, atol=1e-4)
    assert np.allclose(batch[0].embedding, two.embedding, atol=1e-4)
    for name in DIAGNOSIS_NAMES:
        assert batch[1].diagnosis_probs[name] == pytest.approx(one.diagnosis_probs[name], abs=1e-5)


def test_probability_is_one_half_at_the_head_threshold(study_files) -> None:
    bundle = random_bundle("tiny", seed=1)
    volumes, _ = load_study(study_files)
    plain = StudyPredictor(bundle, device="cpu").predict(volumes)

    raw = torch.logit(torch.tensor(plain.diagnosis_probs["tumor_adult_glioma"], dtype=torch.float64)).item()
    thresholds = [0.0] * 52
    thresholds[DIAGNOSIS_NAMES.index("tumor_adult_glioma")] = raw  # operate exactly at this study's logit
    bundle.prima.diagnosis_heads.set_columns_and_thresholds(list(range(52)), thresholds)
    shifted = StudyPredictor(bundle, device="cpu").predict(volumes)

    assert shifted.diagnosis_probs["tumor_adult_glioma"] == pytest.approx(0.5, abs=1e-5)
    assert shifted.diagnosis_probs["cyst_colloid_cyst"] == pytest.approx(
        plain.diagnosis_probs["cyst_colloid_cyst"]
    )


def test_platt_calibration_from_the_manifest_moves_probability_and_threshold_together(study_files) -> None:
    bundle = random_bundle("tiny", seed=2)
    volumes, _ = load_study(study_files)
    plain = StudyPredictor(bundle, device="cpu").predict(volumes)
    bundle.manifest["calibration"] = {"diagnosis": {"structural_edema": [2.0, -1.0]}}
    calibrated = StudyPredictor(bundle, device="cpu").predict(volumes)

    margin = torch.logit(torch.tensor(plain.diagnosis_probs["structural_edema"], dtype=torch.float64)).item()
    assert calibrated.diagnosis_probs["structural_edema"] == pytest.approx(
        1 / (1 + math.exp(-(2 * margin - 1))), abs=1e-5
    )
    assert calibrated.thresholds["structural_edema"] == pytest.approx(1 / (1 + math.e))
    assert (calibrated.diagnosis_probs["structural_edema"] >= calibrated.thresholds["structural_edema"]) == (
        margin >= 0
    )


def test_series_the_tokenizer_refuses_are_reported_and_a_study_without_any_raises(study_files) -> None:
    volumes, _ = load_study(study_files)
    strict = StudyPredictor(random_bundle(), device="cpu", tokenizer=TokenizerConfig(max_patches=150))
    prediction = strict.predict(volumes)  # 12 and 10 slices: 3 x 64 = 192 patches; 8 slices: 128
    assert len(prediction.series_used) == 1
    assert all("more than the 150" in why for why in prediction.series_skipped.values())

    none_fit = StudyPredictor(random_bundle(), device="cpu", tokenizer=TokenizerConfig(max_patches=10))
    with pytest.raises(NoUsableSeries, match="study 0 has no usable series"):
        none_fit.predict(volumes)


def test_each_b_value_of_a_dwi_series_is_encoded_as_its_own_series(predictor, tmp_path: Path) -> None:
    uid = "1.2.3.4.11"
    paths = []
    for b_value in (0, 1000):
        paths += write_series(
            tmp_path / f"b{b_value}",
            n_slices=6,
            series_uid=uid,
            description="AX DWI",
            pixels=lambda k: head_slice(),
            extra={"DiffusionBValue": b_value},
        )[0]
    prediction = predictor.predict_files({uid: paths})

    assert prediction.series_used == [uid]
    assert set(prediction.tokens_per_series) == {f"{uid}#b0", f"{uid}#b1000"}
    assert not prediction.series_skipped


def _explained_as_before(predictor: StudyPredictor, volumes, labels, samples: int) -> dict:
    """The explanation as it was made before the predict pass's features were reused: the study tokenised and
    encoded again, and one LIME run per label (explain_series) in the series chosen for it."""
    from models.explanations import diagnosis_logit, explain_series
    from models.tokenizer import token_features

    series = predictor._tokenize([volumes])[0][0]
    latents = predictor._encode_all(series)
    study = [(token_features(lat, tok), tok.name) for lat, tok in zip(latents, series)]
    result = {}
    for label in labels:
        target = diagnosis_logit(predictor.prima, label)
        index = predictor._most_influential_series(study, [target])[0]
        explanation = explain_series(predictor.prima, study, predictor.study_description, index, target,
                                     samples=samples, seed=0)
        result[label] = (series[index].volume_id, explanation.weights, explanation.top(3))
    return result


def test_explanations_from_the_predict_pass_are_those_of_a_second_encode(predictor, study_files) -> None:
    volumes, _ = load_study(study_files)
    labels = list(DIAGNOSIS_NAMES[:3])
    before = _explained_as_before(predictor, volumes, labels, samples=32)

    with torch.inference_mode():
        prediction = predictor.predict(volumes)
    reused = predictor.explain(volumes, labels, samples=32, inputs=prediction.explain_inputs)
    again = predictor.explain(volumes, labels, samples=32)

    for label in labels:
        volume_id, _weights, top = before[label]
        for explained in (reused[label], again[label]):
            assert explained.volume_id == volume_id
            assert [(loc.token, loc.weight) for loc in explained.locations] == top
    assert [(loc.token, loc.weight) for loc in reused[labels[0]].locations] == \
        [(loc.token, loc.weight) for loc in again[labels[0]].locations]


def test_explanations_of_a_batched_study_match_those_of_the_study_alone(predictor, study_files) -> None:
    volumes, _ = load_study(study_files)
    labels = list(DIAGNOSIS_NAMES[:2])
    predictions = predictor.predict_batch([volumes[1:], volumes])

    batched = predictor.explain(volumes, labels, samples=32, inputs=predictions[1].explain_inputs)
    alone = predictor.explain(volumes, labels, samples=32)

    for label in labels:
        assert batched[label].volume_id == alone[label].volume_id
        assert [loc.token for loc in batched[label].locations] == [loc.token for loc in alone[label].locations]
        assert np.allclose([loc.weight for loc in batched[label].locations],
                           [loc.weight for loc in alone[label].locations], atol=1e-4)
