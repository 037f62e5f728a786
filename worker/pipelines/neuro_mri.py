"""The ``neuro_mri`` pipeline: a brain MR study through the Prima study encoder to a triage result and its SR.

Runs are processed in micro-batches: the claimed run and other ready runs of the pipeline are loaded side by
side (volumes in LPS with their geometry), the model runs once over all of them, and each run is then finished
on its own: LIME regions for the top findings, the result by the configured clinical rules, similar prior
studies (:mod:`worker.slice_evidence`) and zero-shot findings where the bundle carries a text tower, then the
SR, the scores and the deliveries through the run book (:mod:`worker.run_book`). A run that fails is recorded
and the others go on.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import insert

from pacs_bridge.results import Finding, ImageRegion, TriageResult
from sql.schema import events, utcnow
from worker.config import Settings
from worker.input_gate import GateVerdict, read_headers
from worker.metrics import BATCH_SIZE
from worker.run_book import Claimed, RunBook, RunFailed, RunOutcome, Score
from worker.slice_evidence import add_slice_evidence, study_partition
from worker.zero_shot import add_prima_zero_shot

#: The pipeline's name in routing rules, ``processing_runs.pipeline`` and the metrics.
PIPELINE = "neuro_mri"

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A claimed run with its volumes loaded, waiting for the model."""

    claim: Claimed
    image_paths: dict[str, list[Path]]
    volumes: list
    timings: dict[str, float]
    #: The input gate's verdict; an inadequate study is not loaded and never reaches the model.
    verdict: GateVerdict | None = None
    #: The slice index partition of the study (modality and body region).
    partition: str = ""


def make_result(prediction, settings: Settings, study_uid: str, model_name: str, model_version: str,
                regions: dict[str, tuple[ImageRegion, ...]] | None = None) -> TriageResult:
    """Turn the model's probabilities into the reported result, by the configured clinical rules."""
    regions = regions or {}
    model_settings = settings.model
    by_probability = sorted(prediction.diagnosis_probs.items(), key=lambda kv: kv[1], reverse=True)
    reported = [label for label, p in by_probability if p >= prediction.thresholds[label]]
    for label, _ in by_probability:
        if len(reported) >= max(int(model_settings.report_top_k), 1):
            break
        if label not in reported:
            reported.append(label)
    findings = tuple(
        Finding(label=label, probability=float(prediction.diagnosis_probs[label]),
                threshold=float(prediction.thresholds[label]), regions=regions.get(label, ()))
        for label in sorted(reported, key=lambda name: prediction.diagnosis_probs[name], reverse=True)
    )
    # Labels the site has the model rule out: below threshold, reported as explicitly absent (not just
    # unlisted).
    findings += tuple(
        Finding(label=label, probability=float(prediction.diagnosis_probs[label]),
                threshold=float(prediction.thresholds[label]), reported_absent=True)
        for label in model_settings.report_absent
        if label in prediction.diagnosis_probs and label not in reported
        and prediction.diagnosis_probs[label] < prediction.thresholds[label]
    )
    top_class = max(prediction.priority_probs, key=prediction.priority_probs.get)
    priority = model_settings.priority_map.get(top_class)
    if priority is None:
        raise RunFailed(f"priority class {top_class!r} has no entry in model.priority_map")
    referrals = tuple(sorted(
        name for name, p in prediction.referral_probs.items()
        if p >= float(model_settings.referral_threshold)
    ))
    return TriageResult(
        study_instance_uid=study_uid, priority=priority, findings=findings, referrals=referrals,
        model_name=model_name, model_version=model_version,
        priority_scores={k: float(v) for k, v in prediction.priority_probs.items()},
    )


class NeuroMriPipeline:
    """The neuro_mri pipeline of one worker process: holds the loaded model and the loader's processes across
    the runs it handles, and records each run through the run book."""

    def __init__(self, book: RunBook) -> None:
        from worker.study_loader import StudyLoader, pool_size

        self.book = book
        self._predictor = None
        self._bundle = None
        #: Loads studies in processes of its own (worker.load_processes), so that loads run side by side.
        self.loader = StudyLoader(pool_size(int(book.settings.worker.load_processes)))

    @property
    def settings(self) -> Settings:
        return self.book.settings

    @property
    def engine(self):
        return self.book.engine

    # -- model ---------------------------------------------------------------------------------------------
    @property
    def loaded_version(self) -> str | None:
        """The version of the model this process has loaded, or None before the first load."""
        return None if self._bundle is None else self._bundle.version

    def predictor(self, refresh: bool = True):
        """The study predictor of the model that should serve now.

        Before each batch the model registry is asked which version serves
        (``sql.model_registry.serving_version``, one small query); when that differs from the loaded model, its
        bundle is loaded and replaces it, so a promotion or a rollback reaches running workers at their next
        study without a restart. Calls made while a batch is predicted and finished (from ``_predict`` and
        ``_finish``) keep the model the batch started with, so that a run's stamped version, its predictions
        and its SR always agree. With no version in the registry (or no registry tables yet) the configured
        ``model.bundle`` serves. A promoted bundle that cannot be loaded is logged and the loaded model keeps
        serving. The predictor also stores each study's embedding for nightly retraining
        (``sql.embedding_store``).
        """
        if self._predictor is not None and not refresh:
            return self._predictor
        from sqlalchemy.exc import SQLAlchemyError

        from models.backbone import bundle_backbone_id
        from models.bundle import BundleError, load_bundle
        from models.inference import StudyPredictor
        from sql.embedding_store import EmbeddingRecordingPredictor
        from sql.model_registry import serving_version

        try:
            serving = serving_version(self.engine)
        except SQLAlchemyError as exc:  # no registry tables (database not upgraded), or the database blinked
            log.warning("model registry unreadable (%s); keeping the loaded or configured model", exc)
            if self._predictor is not None:
                return self._predictor
            serving = None
        if serving is not None:
            key, bundle_dir = f"registry:{serving.version}", serving.bundle_path
        else:
            bundle_dir = self.settings.model.bundle
            if not bundle_dir:
                raise RunFailed("model.bundle is not configured and no model is promoted in the registry: "
                                "set model.bundle to a model bundle folder (weights are never downloaded)")
            key = f"configured:{bundle_dir}"
        if self._predictor is not None and getattr(self, "_loaded_key", None) == key:
            return self._predictor
        device = self.settings.model.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        threads = int(self.settings.model.cpu_threads)
        if device == "cpu" and threads > 0:
            import torch

            torch.set_num_threads(threads)
        try:
            bundle = load_bundle(Path(bundle_dir), device=device)
        except BundleError as exc:
            if self._predictor is None:
                raise RunFailed(f"model bundle {bundle_dir} cannot be loaded: {exc}") from exc
            log.error("model %s cannot be loaded (%s); %s keeps serving", key, exc, self._bundle.version)
            return self._predictor
        predictor = StudyPredictor(bundle, device=device,
                                   study_description=self.settings.model.study_description)
        previous = None if self._bundle is None else self._bundle.version
        self._bundle, self._loaded_key = bundle, key
        self._predictor = EmbeddingRecordingPredictor(predictor, self.engine, bundle_backbone_id(bundle))
        log.info("model %s loaded from %s (%s)", bundle.version, bundle_dir,
                 "first load" if previous is None else f"replacing {previous}")
        return self._predictor

    # -- the run -------------------------------------------------------------------------------------------
    def process(self, run_id: int, worker_name: str | None = None) -> RunOutcome:
        """Process run ``run_id`` and, as a micro-batch with it, other ready runs of the same pipeline.

        The batch is gathered from the database (urgent lane first, routine runs that waited too long as if
        urgent), up to ``worker.batch_size`` runs or ``worker.batch_wait_s`` seconds; their volumes are loaded
        side by side in the loader's processes, the model runs once over all of them, and each run is then
        finished on its own (a run that fails is recorded and the others go on). While a batch is in the
        model, the next ready runs are claimed and loading (up to ``worker.prefetch_batches`` batches in one
        call, and for no more than half the task's time limit), so the model does not wait for the CPU when
        studies are queued. The other runs' own messages, when they arrive, find them done. ``worker_name``
        (the Celery node name) is recorded with the pid as who ran each run.
        """
        worker_host = f"{worker_name or self.book.host}:{os.getpid()}"
        claimed = self.book.claim(run_id, worker_host)
        if claimed is None:
            return RunOutcome(run_id, "duplicate")
        batch = [claimed] + self._claim_companions(run_id, worker_host)
        outcomes = self._process_batch(batch, worker_host)
        return outcomes[run_id]

    def _process_batch(self, batch: list[Claimed], worker_host: str | None = None) -> dict[int, RunOutcome]:
        """The batch, then (with ``worker_host``) batches of further ready runs claimed while the one before
        is in the model; returns every run's outcome."""
        outcomes: dict[int, RunOutcome] = {}
        try:
            self.predictor()  # the bundle, loaded once per process, before the threads that read it
        except Exception as exc:
            return {claim.run_id: self._fail(claim, exc) for claim in batch}
        worker = self.settings.worker
        batch_size = max(1, int(worker.batch_size))
        more = max(0, int(worker.prefetch_batches) - 1) if worker_host is not None else 0
        deadline = time.monotonic() + 0.5 * float(worker.task_time_limit_s)
        first_run_id = batch[0].run_id
        # Threads only wait: on the database, on the input gate's header reads and on the loader's processes.
        with concurrent.futures.ThreadPoolExecutor(2 * min(batch_size, 4)) as pool:
            pending = [(c, pool.submit(self._prepare, c)) for c in batch]
            while pending:
                prepared = self._gather(pending, outcomes)
                pending = []
                if more > 0 and time.monotonic() < deadline:
                    more -= 1
                    following = self._claim_companions(first_run_id, worker_host, wanted=batch_size,
                                                       wait=False)
                    pending = [(c, pool.submit(self._prepare, c)) for c in following]
                self._predict_and_finish(prepared, outcomes)
        return outcomes

    def _gather(self, pending: list, outcomes: dict[int, RunOutcome]) -> list[Prepared]:
        """The loaded runs of a batch; a run that failed to load or that the input gate refused is finished.
        """
        prepared: list[Prepared] = []
        for claim, future in pending:
            try:
                item = future.result()
            except Exception as exc:
                outcomes[claim.run_id] = self._fail(claim, exc)
                continue
            if item.verdict is not None and not item.verdict.adequate:
                try:
                    outcomes[claim.run_id] = self.book.not_analysed(
                        claim, PIPELINE, item.verdict, item.image_paths, self._bundle.manifest["family"],
                        self._bundle.version)
                except Exception as exc:
                    outcomes[claim.run_id] = self._fail(claim, exc)
                continue
            prepared.append(item)
        return prepared

    def _predict_and_finish(self, prepared: list[Prepared], outcomes: dict[int, RunOutcome]) -> None:
        if not prepared:
            return
        predictions = self._predict(prepared, outcomes)
        for item, prediction in zip(prepared, predictions):
            if prediction is None:
                continue
            try:
                outcomes[item.claim.run_id] = self._finish(item, prediction)
            except Exception as exc:
                outcomes[item.claim.run_id] = self._fail(item.claim, exc)

    def _predict(self, prepared: list[Prepared], outcomes: dict[int, RunOutcome]) -> list:
        """One model pass over the batch; a study the tokenizer cannot use fails alone and the rest run again.
        """
        from models.inference import NoUsableSeries

        remaining = list(range(len(prepared)))
        predictions: list = [None] * len(prepared)
        while remaining:
            t0 = time.perf_counter()
            try:
                results = self.predictor(refresh=False).predict_batch(
                    [prepared[i].volumes for i in remaining])
            except NoUsableSeries as exc:
                failed = remaining.pop(exc.study_index)
                outcomes[prepared[failed].claim.run_id] = self._fail(prepared[failed].claim,
                                                                     RunFailed(str(exc)))
                continue
            elapsed = time.perf_counter() - t0
            BATCH_SIZE.observe(len(remaining))
            for i, prediction in zip(remaining, results):
                prepared[i].timings["predict_s"] = elapsed
                prepared[i].timings["batch_studies"] = len(remaining)
                prepared[i].timings.update({f"model_{k}": float(v) for k, v in prediction.timings_s.items()})
                self.book.stamp(prepared[i].claim.run_id, "inferred_at")
                predictions[i] = prediction
            break
        return predictions

    def _fail(self, claim: Claimed, exc: Exception) -> RunOutcome:
        return self.book.fail(claim, exc, PIPELINE)

    def _claim_companions(self, first_run_id: int, worker_host: str, wanted: int | None = None,
                          wait: bool = True) -> list[Claimed]:
        """Other ready runs of this pipeline for the same model pass: up to ``wanted`` (the batch size less
        one), waiting up to ``worker.batch_wait_s`` for them if ``wait``."""
        worker = self.settings.worker
        if wanted is None:
            wanted = int(worker.batch_size) - 1
        return self.book.claim_companions(first_run_id, worker_host, wanted,
                                          wait_s=float(worker.batch_wait_s) if wait else 0.0)

    def _prepare(self, claim: Claimed) -> Prepared:
        """CPU work before the model: the study's image files, judged by the input gate and loaded as volumes
        with their geometry."""
        timings: dict[str, float] = {}
        image_paths = self.book.image_paths(claim.study_id)
        t0 = time.perf_counter()
        headers = read_headers(image_paths)
        verdict = self.book.judge_input(claim, PIPELINE, headers)
        timings["gate_s"] = time.perf_counter() - t0
        if verdict is not None and not verdict.adequate:
            return Prepared(claim, image_paths, [], timings, verdict)
        model_name, model_version = self._bundle.manifest["family"], self._bundle.version
        t0 = time.perf_counter()
        volumes, skipped = self.loader.load(image_paths)
        timings["load_s"] = time.perf_counter() - t0
        self.book.stamp(claim.run_id, "loaded_at", model_name=model_name, model_version=model_version)
        if skipped:
            with self.engine.begin() as connection:
                connection.execute(insert(events), [
                    {"at": utcnow(), "kind": "series_skipped", "study_instance_uid": claim.study_uid,
                     "reason": f"series {uid}: {why}", "detail": {"series_instance_uid": uid}}
                    for uid, why in skipped.items()
                ])
        if not volumes:
            raise RunFailed(f"no usable series: {skipped}")
        return Prepared(claim, image_paths, volumes, timings, verdict, study_partition(headers))

    def _finish(self, item: Prepared, prediction) -> RunOutcome:
        """After the model: explanation, result, SR, predictions, publications, deliveries, bookkeeping."""
        claim, volumes, image_paths, timings = item.claim, item.volumes, item.image_paths, item.timings
        predictor = self.predictor(refresh=False)
        model_name, model_version = self._bundle.manifest["family"], self._bundle.version
        t0 = time.perf_counter()
        regions = self._explain(predictor, volumes, prediction)
        timings["explain_s"] = time.perf_counter() - t0
        result = make_result(prediction, self.settings, claim.study_uid, model_name, model_version, regions)
        # Similar prior studies (slice_evidence.enabled), within the study's partition (item.partition).
        result = add_slice_evidence(self.book, item, result)
        # Zero-shot findings, where the bundle carries Prima's text tower.
        result = add_prima_zero_shot(self.settings, self._bundle, prediction, result)
        t0 = time.perf_counter()
        sr_path, sr = self.book.write_sr(claim, result, image_paths)
        timings["sr_s"] = time.perf_counter() - t0
        log.info("study %s v%d run %d: SR %s written to %s in %.2fs", claim.study_uid, claim.version,
                 claim.run_id, sr.SOPInstanceUID, sr_path, timings["sr_s"])
        self.book.stamp(claim.run_id, "sr_created_at", sr_sop_instance_uid=str(sr.SOPInstanceUID),
                        sr_path=str(sr_path), priority=result.priority)
        self.book.record_predictions(claim.run_id, prediction_scores(prediction, result))
        outcome = self.book.finish(claim, PIPELINE, result, str(sr.SOPInstanceUID), sr_path, timings,
                                   prediction.diagnosis_probs)
        log.info("run %d study %s v%d: priority %s, %d findings, %.2fs", claim.run_id, claim.study_uid,
                 claim.version, result.priority, len(result.findings),
                 sum(v for k, v in timings.items() if k.endswith("_s")))
        return outcome

    def _explain(self, predictor, volumes, prediction) -> dict[str, tuple[ImageRegion, ...]]:
        """LIME regions for the positive findings (the most probable first, up to ``explain.max_findings``).
        """
        settings = self.settings.explain
        if not settings.enabled:
            return {}
        positive = sorted((label for label, p in prediction.diagnosis_probs.items()
                           if p >= prediction.thresholds[label]),
                          key=lambda label: prediction.diagnosis_probs[label], reverse=True)
        labels = positive[: int(settings.max_findings)]
        if not labels:
            return {}
        # The predict pass's tokens and features: the study is not tokenised nor encoded a second time.
        explained = predictor.explain(volumes, labels, samples=int(settings.samples),
                                      top_tokens=int(settings.top_tokens),
                                      inputs=getattr(prediction, "explain_inputs", None))
        regions = {}
        for label, explanation in explained.items():
            regions[label] = tuple(
                ImageRegion(sop_instance_uid=region.source.sop_instance_uid,
                            sop_class_uid=region.source.sop_class_uid,
                            series_instance_uid=explanation.series_instance_uid,
                            polygon=tuple((float(c), float(r)) for c, r in region.polygon),
                            weight=float(location.weight))
                for location in explanation.locations for region in location.regions
                # The SR's image regions reference single-frame images; frames of a multi-frame object would
                # need a frame number the result type does not carry yet.
                if region.source.frame_number is None
            )
        return regions


def prediction_scores(prediction, result: TriageResult) -> list[Score]:
    """The model's scores as the run book records them: every diagnosis (reported or not), priority class and
    referral."""
    reported = {f.label for f in result.findings}
    scores = [Score("diagnosis", label, float(p), float(prediction.thresholds[label]), label in reported)
              for label, p in prediction.diagnosis_probs.items()]
    scores += [Score("priority", k, float(v), None, False) for k, v in prediction.priority_probs.items()]
    scores += [Score("referral", k, float(v), None, k in result.referrals)
               for k, v in prediction.referral_probs.items()]
    return scores
