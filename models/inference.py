"""The one entry point the worker uses: volumes of a study in, diagnosis/priority/referral probabilities out.

Stages (each timed): tokenize (CPU, per series) -> VQ-VAE over the distinct kept patches of *all* series of
*all* studies in the call, in chunks -> 289-d tokens -> HierViT over zero-padded sequences -> heads.
On CUDA the networks run under bf16 autocast; on CPU in fp32 (the reference's numerics).

Probabilities. Each diagnosis/referral head gives a margin ``m = logit - threshold`` (the reference's output);
we report ``sigmoid(m)``, so 0.5 is exactly the head's operating threshold and ``thresholds`` is 0.5 for every
label. This is a monotone re-expression of the margin, *not* a calibrated probability: a bundle may carry
per-label Platt parameters (manifest ``calibration`` = {"diagnosis"|"referral": {name: [a, b]}}), and then the
probability is ``sigmoid(a * m + b)`` and the label's threshold ``sigmoid(b)`` - still positive exactly when
``m > 0``. Priority is a softmax over the priority classes' raw logits.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike

import numpy as np
import torch

from models.bundle import LoadedBundle
from models.explanations import TokenLocation, diagnosis_logit, explain_series_targets, token_locations
from models.prima import PrimaBatch, StudyOutput
from models.tokenizer import SeriesTokens, TokenizerConfig, token_features, tokenize_volume, vqvae_input
from models.volume import SeriesSkipped, SeriesVolume, load_study
from models.vqvae import encode_patches

log = logging.getLogger(__name__)

DEFAULT_STUDY_DESCRIPTION = "MRI BRAIN WO AND W CONTRAST"


class NoUsableSeries(Exception):
    """A study in which no series could be tokenised; ``skipped`` holds each series' reason."""

    def __init__(self, study_index: int, skipped: Mapping[str, str]) -> None:
        reasons = "; ".join(f"{uid}: {why}" for uid, why in skipped.items()) or "no series given"
        super().__init__(f"study {study_index} has no usable series ({reasons})")
        self.study_index = study_index
        self.skipped = dict(skipped)


@dataclass
class StudyPrediction:
    diagnosis_probs: dict[str, float]  # sigmoid(a * (logit - thresh) + b); a=1, b=0 without calibration
    thresholds: dict[str, float]  # probability at which each diagnosis is called positive (0.5 uncalibrated)
    priority_probs: dict[str, float]  # softmax over the priority classes
    referral_probs: dict[str, float]
    embedding: np.ndarray  # study embedding (float32, embedding_dim)
    series_used: list[str]  # SeriesInstanceUIDs, each once (a 4-D series may give several volumes)
    tokens_per_series: dict[str, int]  # by SeriesVolume.volume_id
    timings_s: dict[str, float]  # load/tokenize/vqvae/vit/heads/total; batch stages are for the whole batch
    series_skipped: dict[str, str] = field(default_factory=dict)
    referral_thresholds: dict[str, float] = field(default_factory=dict)
    model_version: str = ""
    #: The predict pass's tokens and token features of this study, for :meth:`StudyPredictor.explain` (so an
    #: explanation never tokenises the study or runs the VQ-VAE again). Not part of the result.
    explain_inputs: ExplainInputs | None = field(default=None, repr=False, compare=False)


@dataclass
class ExplainInputs:
    """One study as the model saw it: each kept series' tokens and its (K, 289) token features on the device."""

    series: list[SeriesTokens]
    features: list[torch.Tensor]


@dataclass
class FindingExplanation:
    """Where a finding came from: the explained series, the surrogate's fit, the top tokens on the images."""

    label: str
    series_instance_uid: str
    volume_id: str
    r2: float
    locations: list[TokenLocation]


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for a name; "auto" means cuda when available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _StageClock:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # GPU work is asynchronous: charge it to its own stage
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _platt(names: Sequence[str], table: Mapping[str, Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    slopes = torch.tensor([float(table.get(n, (1.0, 0.0))[0]) for n in names])
    intercepts = torch.tensor([float(table.get(n, (1.0, 0.0))[1]) for n in names])
    return slopes, intercepts


class StudyPredictor:
    """Runs a loaded bundle on studies. Not thread-safe; one per worker process (it holds the weights)."""

    def __init__(
        self,
        bundle: LoadedBundle,
        device: str = "auto",
        study_description: str = DEFAULT_STUDY_DESCRIPTION,
        tokenizer: TokenizerConfig | None = None,
        vqvae_chunk: int | None = None,
    ) -> None:
        """``device``: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
        ``study_description``: the text fed to the study-description encoder (a configuration string in Prima,
        not the DICOM tag). ``vqvae_chunk``: patches per VQ-VAE call (default 2048 on CUDA, 256 on CPU)."""
        self.device = resolve_device(device)
        self.bundle = bundle
        self.vqvae = bundle.vqvae.to(self.device).eval()
        self.prima = bundle.prima.to(self.device).eval()
        self.study_description = study_description
        self.tokenizer = tokenizer or TokenizerConfig()
        self.vqvae_chunk = vqvae_chunk or (2048 if self.device.type == "cuda" else 256)
        calibration = bundle.manifest.get("calibration", {})
        self._diagnosis_platt = _platt(self.prima.diagnosis_names, calibration.get("diagnosis", {}))
        self._referral_platt = _platt(self.prima.referral_names, calibration.get("referral", {}))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def predict(self, volumes: Sequence[SeriesVolume]) -> StudyPrediction:
        return self.predict_batch([volumes])[0]

    def predict_files(self, paths_by_series: Mapping[str, Sequence[str | PathLike[str]]]) -> StudyPrediction:
        """Load a study's series from files, then :meth:`predict`; load-time skips appear in series_skipped."""
        start = time.perf_counter()
        volumes, skipped = load_study(paths_by_series)
        load_time = time.perf_counter() - start
        if not volumes:
            raise NoUsableSeries(0, skipped)
        prediction = self.predict(volumes)
        prediction.series_skipped = {**skipped, **prediction.series_skipped}
        prediction.timings_s["load"] = load_time
        prediction.timings_s["total"] += load_time
        return prediction

    def _tokenize(
        self, studies: Sequence[Sequence[SeriesVolume]]
    ) -> tuple[list[list[SeriesTokens]], list[dict[str, str]]]:
        tokenized, skipped = [], []
        for index, volumes in enumerate(studies):
            kept, reasons = [], {}
            for volume in volumes:
                try:
                    kept.append(tokenize_volume(volume, self.tokenizer))
                except SeriesSkipped as skip:
                    reasons[volume.volume_id] = skip.reason
            if not kept:
                raise NoUsableSeries(index, reasons)
            tokenized.append(kept)
            skipped.append(reasons)
        return tokenized, skipped

    def _encode_all(self, series: list[SeriesTokens]) -> list[torch.Tensor]:
        """Latents of every series' distinct patches; one pass per thin axis over all series, in chunks."""
        latents: list[torch.Tensor | None] = [None] * len(series)
        for thin_axis in range(3):
            members = [i for i, s in enumerate(series) if s.thin_axis == thin_axis]
            if not members:
                continue
            patches = torch.from_numpy(np.concatenate([series[i].patches for i in members]))
            encoded = []
            for start in range(0, len(patches), self.vqvae_chunk):
                chunk = patches[start : start + self.vqvae_chunk].to(self.device, non_blocking=True)
                with self._autocast():
                    encoded.append(encode_patches(self.vqvae, vqvae_input(chunk, thin_axis)).float())
            all_latents = torch.cat(encoded)
            for i, part in zip(members, all_latents.split([len(series[i].patches) for i in members])):
                latents[i] = part
        return latents  # type: ignore[return-value]

    @torch.inference_mode()
    def predict_batch(self, studies: Sequence[Sequence[SeriesVolume]]) -> list[StudyPrediction]:
        """Predict several studies in one pass. Raises :class:`NoUsableSeries` (before any network runs) when a
        study has no series that can be tokenised; drop that study and call again."""
        clock = _StageClock(self.device)
        start = time.perf_counter()
        with clock.stage("tokenize"):
            tokenized, skipped = self._tokenize(studies)
        flat = [tokens for study in tokenized for tokens in study]
        with clock.stage("vqvae"):
            latents = self._encode_all(flat)
        with clock.stage("vit"):
            features_of = [token_features(lat, tokens) for lat, tokens in zip(latents, flat)]
            features = iter(features_of)
            batch = PrimaBatch.from_studies(
                [[(next(features), tokens.name) for tokens in study] for study in tokenized],
                [self.study_description] * len(tokenized),
                series_uids=[t.series_instance_uid for t in flat],
            )
            with self._autocast():
                embedding = self.prima.visual(batch)
        with clock.stage("heads"):
            with self._autocast():
                output = self.prima.heads(embedding)
            output = StudyOutput(**{k: v.float().cpu() for k, v in vars(output).items()})
        clock.timings["load"] = 0.0
        clock.timings["total"] = time.perf_counter() - start
        predictions = [
            self._study_prediction(output, b, study, skipped[b], dict(clock.timings))
            for b, study in enumerate(tokenized)
        ]
        for prediction, inputs in zip(predictions, self._explain_inputs(tokenized, features_of)):
            prediction.explain_inputs = inputs
        return predictions

    def _explain_inputs(self, tokenized: list[list[SeriesTokens]], features: list[torch.Tensor]
                        ) -> list[ExplainInputs]:
        parts = iter(features)
        return [ExplainInputs(study, [next(parts) for _ in study]) for study in tokenized]

    @torch.inference_mode()
    def explain(
        self,
        volumes: Sequence[SeriesVolume],
        labels: Sequence[str],
        samples: int = 256,
        top_tokens: int = 3,
        seed: int = 0,
        inputs: ExplainInputs | None = None,
    ) -> dict[str, FindingExplanation]:
        """LIME for each diagnosis in ``labels``: the tokens that drive its logit, located on the source images.

        Like the reference, one series is explained per finding: here the one whose removal lowers the
        finding's logit most (one forward pass per series, for all labels at once), so the regions come from
        the series that carries the finding rather than from a fixed choice. ``inputs``: the predict pass's
        tokens and features of this study (``StudyPrediction.explain_inputs``); without them the study is
        tokenised and encoded again. Labels explained in the same series share their perturbed samples (the
        same masks, one pass of the networks, each label's logit read from it): the same result as one LIME
        run per label.
        """
        if inputs is None:
            tokenized, _ = self._tokenize([volumes])
            series = tokenized[0]
            latents = self._encode_all(series)
            features = [token_features(lat, tok) for lat, tok in zip(latents, series)]
        else:
            series, features = inputs.series, inputs.features
        study = [(feature.to(self.device), tok.name) for feature, tok in zip(features, series)]
        by_volume = {volume.volume_id: volume for volume in volumes}
        autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        targets = {label: diagnosis_logit(self.prima, label) for label in labels}
        chosen = self._most_influential_series(study, list(targets.values()))
        by_series: dict[int, list[str]] = {}
        for label, index in zip(targets, chosen):
            by_series.setdefault(index, []).append(label)
        explained = {}
        for index, series_labels in by_series.items():
            explanations = explain_series_targets(
                self.prima, study, self.study_description, index, [targets[label] for label in series_labels],
                samples=samples, seed=seed, autocast_dtype=autocast_dtype)
            tokens = series[index]
            volume = by_volume[tokens.volume_id]
            for label, explanation in zip(series_labels, explanations):
                explained[label] = FindingExplanation(
                    label=label,
                    series_instance_uid=tokens.series_instance_uid,
                    volume_id=tokens.volume_id,
                    r2=explanation.fit.score,
                    locations=token_locations(volume, tokens, explanation.top(top_tokens)),
                )
        return {label: explained[label] for label in labels}

    def _most_influential_series(self, study: list[tuple[torch.Tensor, str]], targets: Sequence) -> list[int]:
        """For each target, the series whose removal lowers it most (one forward pass for all targets)."""
        if len(study) == 1:
            return [0] * len(targets)
        variants = [study] + [study[:i] + study[i + 1 :] for i in range(len(study))]
        batch = PrimaBatch.from_studies(variants, [self.study_description] * len(variants))
        with self._autocast():
            output = self.prima.heads(self.prima.visual(batch))
        chosen = []
        for target in targets:
            values = target(output).float().cpu()
            drop = values[0] - values[1:]
            chosen.append(int(torch.argmax(drop)))
        return chosen

    def _study_prediction(
        self,
        output: StudyOutput,
        b: int,
        series: list[SeriesTokens],
        skipped: dict[str, str],
        timings: dict[str, float],
    ) -> StudyPrediction:
        prima = self.prima
        diagnosis_slope, diagnosis_intercept = self._diagnosis_platt
        referral_slope, referral_intercept = self._referral_platt
        diagnosis = torch.sigmoid(diagnosis_slope * output.diagnosis_logits[b] + diagnosis_intercept)
        referral = torch.sigmoid(referral_slope * output.referral_logits[b] + referral_intercept)
        priority = torch.softmax(output.priority_logits[b], dim=0)
        return StudyPrediction(
            diagnosis_probs=dict(zip(prima.diagnosis_names, diagnosis.tolist())),
            thresholds=dict(zip(prima.diagnosis_names, torch.sigmoid(diagnosis_intercept).tolist())),
            priority_probs=dict(zip(prima.priority_classes, priority.tolist())),
            referral_probs=dict(zip(prima.referral_names, referral.tolist())),
            embedding=output.embedding[b].numpy().astype(np.float32),
            series_used=list(dict.fromkeys(s.series_instance_uid for s in series)),
            tokens_per_series={s.volume_id or s.series_instance_uid: s.n_tokens for s in series},
            timings_s=timings,
            series_skipped=dict(skipped),
            referral_thresholds=dict(zip(prima.referral_names, torch.sigmoid(referral_intercept).tolist())),
            model_version=self.bundle.version,
        )
