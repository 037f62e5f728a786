"""Processing one run: a complete study version in, predictions, an SR and its deliveries out.

Each step's timestamp is written to the run, so the AI turnaround (last image to SR delivered) and where the
time went can be read from the database. The run is idempotent: a redelivered task for a finished run does
nothing, and a re-attempt after a crash writes the same SR (its UIDs derive from the study version) instead
of a second one. Delivery is a task of its own (:mod:`worker.delivery`): a PACS that is down delays the SR's
arrival, never the processing of the next study.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import and_, case, insert, or_, select, update
from sqlalchemy.engine import Engine

from pacs_bridge.results import Finding, ImageRegion, NotAnalysed, TriageResult
from pacs_bridge.routing import is_derived_object
from pacs_bridge.schema import as_utc, events, instances, predictions, processing_runs, series, studies, utcnow
from worker.config import Settings
from worker.delivery import DeliveryBook
from worker.input_gate import GatePolicy, GateVerdict, assess, read_headers, series_inputs
from worker.publishing import publish_result
from worker.metrics import BATCH_SIZE, INPUT_GATE_REFUSALS, RUNS, STAGE_SECONDS, TURNAROUND_SECONDS

log = logging.getLogger(__name__)


class RunFailed(Exception):
    """The study cannot be processed (no usable series, say); the reason is recorded and not retried."""


#: Run status and study status of a study the input gate turned away.
NOT_ANALYSED_RUN = "not_analysed"
NOT_ANALYSED_STUDY = "not analysed"


@dataclass(frozen=True)
class Claimed:
    """A run this worker holds: ids and the study version it processes."""

    run_id: int
    study_id: int
    study_uid: str
    version: int


@dataclass
class Prepared:
    """A claimed run with its volumes loaded, waiting for the model."""

    claim: Claimed
    image_paths: dict[str, list[Path]]
    volumes: list
    timings: dict[str, float]
    #: The input gate's verdict; an inadequate study is not loaded and never reaches the model.
    verdict: "GateVerdict | None" = None
    #: The slice index partition of the study (modality and body region).
    partition: str = ""


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    status: str  # done | not_analysed | duplicate | failed
    sr_path: Path | None = None
    result: TriageResult | NotAnalysed | None = None


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
    # Labels the site has the model rule out: below threshold, reported as explicitly absent (not just unlisted).
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
        name for name, p in prediction.referral_probs.items() if p >= float(model_settings.referral_threshold)
    ))
    return TriageResult(
        study_instance_uid=study_uid, priority=priority, findings=findings, referrals=referrals,
        model_name=model_name, model_version=model_version,
        priority_scores={k: float(v) for k, v in prediction.priority_probs.items()},
    )


class RunProcessor:
    """Holds what is expensive to set up (engine, loaded model) across the runs a worker process handles."""

    def __init__(self, settings: Settings, engine: Engine, enqueue_delivery: Callable[[int], None],
                 enqueue_publication: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.deliveries = DeliveryBook(settings, engine)
        #: Hands a delivery id to the delivery queue (a Celery task in the service).
        self.enqueue_delivery = enqueue_delivery
        #: Hands a run id to the publication task (the service); None publishes in this process, now.
        self.enqueue_publication = enqueue_publication
        self._predictor = None
        self._bundle = None
        from worker.study_loader import StudyLoader, pool_size

        #: Loads studies in processes of its own (worker.load_processes), so that loads run side by side.
        self.loader = StudyLoader(pool_size(int(settings.worker.load_processes)))
        # The run records <worker>:<pid>, so an operator (or a fault test) can tell which process holds it.
        self.host = socket.gethostname()

    def publish(self, run_id: int, result) -> None:
        """The run's worklist priority: queued as a retried task of its own in the service (never published
        inside the GPU task); published here and now without a queue (demo, tests). Never raises."""
        if self.enqueue_publication is None:
            publish_result(self.settings, self.engine, run_id, result)
            return
        try:
            self.enqueue_publication(run_id)
        except Exception:  # the broker is down: the run's SR still goes out; `triage publications retry` later
            log.exception("run %d: the publication task could not be queued", run_id)

    # -- model ---------------------------------------------------------------------------------------------
    @property
    def loaded_version(self) -> str | None:
        """The version of the model this process has loaded, or None before the first load."""
        return None if self._bundle is None else self._bundle.version

    def predictor(self, refresh: bool = True):
        """The study predictor of the model that should serve now.

        Before each batch the model registry is asked which version serves (``train.registry.serving_version``,
        one small query); when that differs from the loaded model, its bundle is loaded and replaces it, so a
        promotion or a rollback reaches running workers at their next study without a restart. Calls made while
        a batch is predicted and finished (from ``_predict`` and ``_finish``) keep the model the batch started
        with, so that a run's stamped version, its predictions and its SR always agree. With no version in the
        registry (or no registry tables yet) the configured ``model.bundle`` serves. A promoted bundle that
        cannot be loaded is logged and the loaded model keeps serving. The predictor also stores each study's
        embedding for nightly retraining (``train.embedding_store``).
        """
        if self._predictor is not None and not refresh:
            return self._predictor
        from sqlalchemy.exc import SQLAlchemyError

        from models.bundle import BundleError, load_bundle
        from models.inference import StudyPredictor
        from train.backbone import bundle_backbone_id
        from train.embedding_store import EmbeddingRecordingPredictor
        from train.registry import serving_version

        try:
            serving = serving_version(self.engine)
        except SQLAlchemyError as exc:  # registry tables missing (database not upgraded) or the database blinked
            log.warning("model registry unreadable (%s); keeping the loaded or configured model", exc)
            if self._predictor is not None:
                return self._predictor
            serving = None
        if serving is not None:
            key, bundle_dir = f"registry:{serving.version}", serving.bundle_path
        else:
            bundle_dir = self.settings.model.bundle
            if not bundle_dir:
                raise RunFailed("model.bundle is not configured and no model is promoted in the registry: set "
                                "model.bundle to a model bundle folder (weights are never downloaded)")
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
        urgent), up to ``worker.batch_size`` runs or ``worker.batch_wait_s`` seconds; their volumes are loaded side
        by side in the loader's processes, the model runs once over all of them, and each run is then finished on
        its own (a run that fails is recorded and the others go on). While a batch is in the model, the next
        ready runs are claimed and loading (up to ``worker.prefetch_batches`` batches in one call, and for no
        more than half the task's time limit), so the model does not wait for the CPU when studies are queued.
        The other runs' own messages, when they arrive, find them done. ``worker_name`` (the Celery node name)
        is recorded with the pid as who ran each run.
        """
        worker_host = f"{worker_name or self.host}:{os.getpid()}"
        from worker.slice_evidence import slice_knn_processor_for  # CR/DX/CT: kNN findings and evidence only

        if (slice_knn := slice_knn_processor_for(self, run_id)) is not None:
            return slice_knn.process(run_id, worker_host)
        claimed = self._claim(run_id, worker_host)
        if claimed is None:
            return RunOutcome(run_id, "duplicate")
        batch = [Claimed(run_id, *claimed)] + self._claim_companions(run_id, worker_host)
        outcomes = self._process_batch(batch, worker_host)
        return outcomes[run_id]

    def _process_batch(self, batch: list["Claimed"], worker_host: str | None = None) -> dict[int, RunOutcome]:
        """The batch, then (with ``worker_host``) batches of further ready runs claimed while the one before is
        in the model; returns every run's outcome."""
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
                    following = self._claim_companions(first_run_id, worker_host, wanted=batch_size, wait=False)
                    pending = [(c, pool.submit(self._prepare, c)) for c in following]
                self._predict_and_finish(prepared, outcomes)
        return outcomes

    def _gather(self, pending: list, outcomes: dict[int, RunOutcome]) -> list["Prepared"]:
        """The loaded runs of a batch; a run that failed to load or that the input gate refused is finished."""
        prepared: list[Prepared] = []
        for claim, future in pending:
            try:
                item = future.result()
            except Exception as exc:
                outcomes[claim.run_id] = self._fail(claim, exc)
                continue
            if item.verdict is not None and not item.verdict.adequate:
                try:
                    outcomes[claim.run_id] = self.not_analysed(
                        claim, "neuro_mri", item.verdict, item.image_paths, self._bundle.manifest["family"],
                        self._bundle.version)
                except Exception as exc:
                    outcomes[claim.run_id] = self._fail(claim, exc)
                continue
            prepared.append(item)
        return prepared

    def _predict_and_finish(self, prepared: list["Prepared"], outcomes: dict[int, RunOutcome]) -> None:
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

    def _predict(self, prepared: list["Prepared"], outcomes: dict[int, RunOutcome]) -> list:
        """One model pass over the batch; a study the tokenizer cannot use fails alone and the rest run again."""
        from models.inference import NoUsableSeries

        remaining = list(range(len(prepared)))
        predictions: list = [None] * len(prepared)
        while remaining:
            t0 = time.perf_counter()
            try:
                results = self.predictor(refresh=False).predict_batch([prepared[i].volumes for i in remaining])
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
                self._stamp(prepared[i].claim.run_id, "inferred_at")
                predictions[i] = prediction
            break
        return predictions

    def _fail(self, claim: "Claimed", exc: Exception) -> RunOutcome:
        reason = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
        log.error("run %d for study %s failed: %s", claim.run_id, claim.study_uid, reason,
                  exc_info=not isinstance(exc, RunFailed))
        with self.engine.begin() as connection:
            connection.execute(update(processing_runs).where(processing_runs.c.id == claim.run_id)
                               .values(status="failed", error=reason, finished_at=utcnow()))
            connection.execute(update(studies).where(and_(studies.c.id == claim.study_id,
                                                          studies.c.version == claim.version))
                               .values(status="failed"))
            connection.execute(insert(events).values(at=utcnow(), kind="error", study_instance_uid=claim.study_uid,
                                                     reason=f"run {claim.run_id} failed: {reason}"))
        RUNS.labels(pipeline="neuro_mri", outcome="failed").inc()
        return RunOutcome(claim.run_id, "failed")

    def _claim_companions(self, first_run_id: int, worker_host: str, wanted: int | None = None,
                          wait: bool = True) -> list["Claimed"]:
        """Other ready runs of the first run's pipeline for the same model pass, urgent first, none starving:
        up to ``wanted`` (the batch size less one), waiting up to ``worker.batch_wait_s`` for them if ``wait``."""
        if wanted is None:
            wanted = int(self.settings.worker.batch_size) - 1
        if wanted <= 0:
            return []
        deadline = time.monotonic() + (float(self.settings.worker.batch_wait_s) if wait else 0.0)
        starving_before = utcnow() - timedelta(seconds=float(self.settings.worker.starvation_after_s))
        with self.engine.connect() as connection:
            pipeline = connection.execute(select(processing_runs.c.pipeline)
                                          .where(processing_runs.c.id == first_run_id)).scalar_one()
        companions: list[Claimed] = []
        tried: set[int] = {first_run_id}
        while len(companions) < wanted:
            first_in_line = case((or_(processing_runs.c.lane == "urgent",
                                      processing_runs.c.queued_at < starving_before), 0), else_=1)
            with self.engine.connect() as connection:
                candidates = connection.execute(
                    select(processing_runs.c.id)
                    .where(and_(processing_runs.c.status == "queued", processing_runs.c.pipeline == pipeline,
                                processing_runs.c.id.not_in(tried)))
                    .order_by(first_in_line, processing_runs.c.queued_at, processing_runs.c.id)
                    .limit(wanted - len(companions))
                ).scalars().all()
            for candidate in candidates:
                tried.add(candidate)
                claimed = self._claim(candidate, worker_host)
                if claimed is not None:
                    companions.append(Claimed(candidate, *claimed))
            if len(companions) >= wanted or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        return companions

    def _claim(self, run_id: int, worker_host: str) -> tuple[int, str, int] | None:
        """Take the run for this worker, atomically; None when it is finished, taken, or out of attempts.

        A run is claimable when queued, or when 'running' for longer than the task's hard time limit (its
        worker died: SIGKILL, OOM, power). The conditional UPDATE makes two workers holding duplicate messages
        for one run race safely: exactly one of them gets it.
        """
        now = utcnow()
        stale_before = now - timedelta(seconds=float(self.settings.worker.task_time_limit_s))
        max_attempts = int(self.settings.worker.max_attempts)
        with self.engine.begin() as connection:
            claimed = connection.execute(
                update(processing_runs)
                .where(and_(
                    processing_runs.c.id == run_id,
                    processing_runs.c.attempts < max_attempts,
                    or_(processing_runs.c.status == "queued",
                        and_(processing_runs.c.status == "running", processing_runs.c.started_at < stale_before)),
                ))
                .values(status="running", attempts=processing_runs.c.attempts + 1, started_at=now,
                        worker_host=worker_host)
            ).rowcount == 1
            row = connection.execute(
                select(processing_runs.c.status, processing_runs.c.attempts, processing_runs.c.study_id,
                       processing_runs.c.study_version, studies.c.study_instance_uid)
                .select_from(processing_runs.join(studies, studies.c.id == processing_runs.c.study_id))
                .where(processing_runs.c.id == run_id)
            ).first()
            if row is None:
                raise RunFailed(f"processing run {run_id} does not exist")
            if not claimed:
                if row.status in ("queued", "running") and row.attempts >= max_attempts:
                    connection.execute(update(processing_runs).where(processing_runs.c.id == run_id).values(
                        status="failed", error=f"gave up after {row.attempts} attempts", finished_at=now))
                    connection.execute(insert(events).values(
                        at=now, kind="error", study_instance_uid=row.study_instance_uid,
                        reason=f"run {run_id} abandoned after {row.attempts} attempts (worker lost each time?)"))
                return None
            connection.execute(update(studies).where(and_(studies.c.id == row.study_id,
                                                          studies.c.version == row.study_version))
                               .values(status="processing"))
        return row.study_id, row.study_instance_uid, row.study_version

    def _prepare(self, claim: "Claimed") -> "Prepared":
        """CPU work before the model: the study's image files, loaded as volumes with their geometry."""
        run_id, study_id, study_uid = claim.run_id, claim.study_id, claim.study_uid
        timings: dict[str, float] = {}
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(series.c.series_instance_uid, series.c.modality, instances.c.sop_class_uid, instances.c.path)
                .select_from(series.join(instances, instances.c.series_id == series.c.id))
                .where(series.c.study_id == study_id)
            ).all()
        image_paths: dict[str, list[Path]] = defaultdict(list)
        for r in rows:
            if not is_derived_object(r.modality or "", r.sop_class_uid):
                image_paths[r.series_instance_uid].append(Path(r.path))
        if not image_paths:
            raise RunFailed("the study has no image instances")

        from worker.slice_evidence import study_partition

        t0 = time.perf_counter()
        headers = read_headers(image_paths)
        verdict = self.judge_input(claim, "neuro_mri", headers)
        timings["gate_s"] = time.perf_counter() - t0
        if verdict is not None and not verdict.adequate:
            return Prepared(claim, dict(image_paths), [], timings, verdict)
        model_name, model_version = self._bundle.manifest["family"], self._bundle.version
        t0 = time.perf_counter()
        volumes, skipped = self.loader.load(dict(image_paths))
        timings["load_s"] = time.perf_counter() - t0
        self._stamp(run_id, "loaded_at", model_name=model_name, model_version=model_version)
        if skipped:
            with self.engine.begin() as connection:
                connection.execute(insert(events), [
                    {"at": utcnow(), "kind": "series_skipped", "study_instance_uid": study_uid,
                     "reason": f"series {uid}: {why}", "detail": {"series_instance_uid": uid}}
                    for uid, why in skipped.items()
                ])
        if not volumes:
            raise RunFailed(f"no usable series: {skipped}")
        return Prepared(claim, dict(image_paths), volumes, timings, verdict, study_partition(headers))

    def _finish(self, item: "Prepared", prediction) -> RunOutcome:
        """After the model: explanation, result, SR, predictions, publications, deliveries, bookkeeping."""
        run_id, study_id, study_uid, version = (item.claim.run_id, item.claim.study_id, item.claim.study_uid,
                                                item.claim.version)
        volumes, image_paths, timings = item.volumes, item.image_paths, item.timings
        predictor = self.predictor(refresh=False)
        model_name, model_version = self._bundle.manifest["family"], self._bundle.version
        t0 = time.perf_counter()
        regions = self._explain(predictor, volumes, prediction)
        timings["explain_s"] = time.perf_counter() - t0
        result = make_result(prediction, self.settings, study_uid, model_name, model_version, regions)
        from worker.slice_evidence import add_slice_evidence  # similar prior studies (slice_evidence.enabled)

        result = add_slice_evidence(self, item, result)  # within the study's partition (item.partition)
        from worker.zero_shot import add_prima_zero_shot  # where the bundle carries Prima's text tower

        result = add_prima_zero_shot(self.settings, self._bundle, prediction, result)
        t0 = time.perf_counter()
        sr_path, sr = self._write_sr(run_id, study_id, study_uid, version, result,
                                     [p for paths in image_paths.values() for p in paths])
        timings["sr_s"] = time.perf_counter() - t0
        log.info("study %s v%d run %d: SR %s written to %s in %.2fs", study_uid, version, run_id, sr.SOPInstanceUID,
                 sr_path, timings["sr_s"])
        self._stamp(run_id, "sr_created_at", sr_sop_instance_uid=str(sr.SOPInstanceUID), sr_path=str(sr_path),
                    priority=result.priority)
        self._record_predictions(run_id, prediction, result)
        self.publish(run_id, result)

        delivery_ids = self.deliveries.create(run_id, str(sr.SOPInstanceUID), sr_path)
        # The routing rule's forwards after processing, decided on this result (routing as a router).
        forward_ids = self.deliveries.create_forwards_after(run_id, result, prediction.diagnosis_probs)
        # Queued before the run is marked done: a crash in between redoes the run (same SR, same delivery rows;
        # a delivered row is never sent again), where the other order could leave a delivery never queued.
        for delivery_id in delivery_ids + forward_ids:
            self.enqueue_delivery(delivery_id)
        finished = utcnow()
        with self.engine.begin() as connection:
            connection.execute(update(processing_runs).where(processing_runs.c.id == run_id).values(
                status="done", finished_at=finished, timings=timings,
                # With nowhere to send it, the SR written to the outbox is the delivery.
                delivered_at=None if delivery_ids else finished))
            connection.execute(update(studies).where(and_(studies.c.id == study_id, studies.c.version == version))
                               .values(status="done"))
        RUNS.labels(pipeline="neuro_mri", outcome="done").inc()
        for stage, seconds in timings.items():
            if stage.endswith("_s"):
                STAGE_SECONDS.labels(stage=stage[:-2]).observe(seconds)
        with self.engine.connect() as connection:
            stamps = connection.execute(select(processing_runs.c.last_image_at, processing_runs.c.sr_created_at)
                                        .where(processing_runs.c.id == run_id)).one()
        if stamps.last_image_at is not None and stamps.sr_created_at is not None:
            TURNAROUND_SECONDS.labels(pipeline="neuro_mri").observe(
                (as_utc(stamps.sr_created_at) - as_utc(stamps.last_image_at)).total_seconds())
        log.info("run %d study %s v%d: priority %s, %d findings, %.2fs", run_id, study_uid, version,
                 result.priority, len(result.findings), sum(v for k, v in timings.items() if k.endswith("_s")))
        return RunOutcome(run_id, "done", sr_path, result)

    # -- the input gate ---------------------------------------------------------------------------------------
    def judge_input(self, claim: "Claimed", pipeline: str, headers: dict) -> GateVerdict | None:
        """The input gate's verdict on a run's study (headers by series), or None when the gate is off.

        The required series are the gate's own, or the routing rule's ``expected_series`` (looked up by the rule
        name the run was created under), searched in SeriesDescription as completion searches them.
        """
        gate = self.settings.input_gate
        if not gate.enabled or pipeline not in type(gate).model_fields:
            return None
        policy = GatePolicy.from_config(pipeline, getattr(gate, pipeline).model_dump())
        expected: tuple = ()
        if policy.required_series is None:
            from pacs_bridge.rules import RuleSet

            with self.engine.connect() as connection:
                routing = connection.execute(select(processing_runs.c.routing)
                                             .where(processing_runs.c.id == claim.run_id)).scalar_one_or_none()
            rule = RuleSet.from_config(self.settings.routing.model_dump()).rule(str((routing or {}).get("rule") or ""))
            expected = rule.expected_series if rule is not None else ()
        return assess(series_inputs(headers), policy, expected)

    def not_analysed(self, claim: "Claimed", pipeline: str, verdict: GateVerdict, image_paths: dict[str, list[Path]],
                     model_name: str, model_version: str) -> RunOutcome:
        """Record a study the input gate turned away: no priority raised, no forward after processing, an event,
        the metric, run status ``not_analysed``, study status "not analysed", and the SR that says why (unless
        ``input_gate.write_sr`` is off), delivered like any result SR."""
        run_id = claim.run_id
        outcome = NotAnalysed(claim.study_uid, pipeline, verdict.reasons, model_name, model_version)
        log.info("run %d study %s v%d (%s): not analysed: %s", run_id, claim.study_uid, claim.version, pipeline,
                 "; ".join(verdict.reasons))
        sr_path, delivery_ids = None, []
        if self.settings.input_gate.write_sr:
            sr_path, sr = self._write_sr(run_id, claim.study_id, claim.study_uid, claim.version, outcome,
                                         [p for paths in image_paths.values() for p in paths])
            self._stamp(run_id, "sr_created_at", sr_sop_instance_uid=str(sr.SOPInstanceUID), sr_path=str(sr_path))
            delivery_ids = self.deliveries.create(run_id, str(sr.SOPInstanceUID), sr_path)
            for delivery_id in delivery_ids:
                self.enqueue_delivery(delivery_id)
        finished = utcnow()
        with self.engine.begin() as connection:
            connection.execute(update(processing_runs).where(processing_runs.c.id == run_id).values(
                status=NOT_ANALYSED_RUN, finished_at=finished, priority=None, model_name=model_name[:64],
                model_version=model_version[:128],
                error="not analysed: " + "; ".join(verdict.reasons),
                delivered_at=None if delivery_ids else finished))
            connection.execute(update(studies).where(and_(studies.c.id == claim.study_id,
                                                          studies.c.version == claim.version))
                               .values(status=NOT_ANALYSED_STUDY))
            connection.execute(predictions.delete().where(predictions.c.run_id == run_id))
            connection.execute(insert(events).values(
                at=finished, kind="not_analysed", study_instance_uid=claim.study_uid,
                reason=f"run {run_id} ({pipeline}) not analysed: " + "; ".join(verdict.reasons),
                detail={"run_id": run_id, "pipeline": pipeline, "version": claim.version,
                        "reasons": list(verdict.reasons), "checks": list(verdict.checks),
                        "sr_written": sr_path is not None}))
        RUNS.labels(pipeline=pipeline, outcome=NOT_ANALYSED_RUN).inc()
        for check in verdict.checks:
            INPUT_GATE_REFUSALS.labels(pipeline=pipeline, check=check).inc()
        return RunOutcome(run_id, NOT_ANALYSED_RUN, sr_path, outcome)

    def _explain(self, predictor, volumes, prediction) -> dict[str, tuple[ImageRegion, ...]]:
        """LIME regions for the positive findings (the most probable first, up to ``explain.max_findings``)."""
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

    def _stamp(self, run_id: int, column: str, **values) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(processing_runs).where(processing_runs.c.id == run_id)
                               .values(**{column: utcnow()}, **values))

    def _write_sr(self, run_id: int, study_id: int, study_uid: str, version: int,
                  result: TriageResult | NotAnalysed, image_paths: list[Path]):
        from pacs_bridge.sr import build_sr

        evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(image_paths)]
        previous = None
        if version > 1:
            with self.engine.connect() as connection:
                prior = connection.execute(
                    select(processing_runs.c.sr_path)
                    .where(and_(processing_runs.c.study_id == study_id, processing_runs.c.study_version < version,
                                processing_runs.c.sr_path.is_not(None)))
                    .order_by(processing_runs.c.study_version.desc())
                ).first()
            if prior is not None and Path(prior.sr_path).exists():
                previous = pydicom.dcmread(prior.sr_path)
        # Deterministic UIDs per study version: a re-attempt after a crash rewrites the same SR, never a second.
        seed = [self.settings.device_uid, study_uid, str(version)]
        sr = build_sr(
            result, evidence,
            series_instance_uid=generate_uid(entropy_srcs=seed + ["series"]),
            sop_instance_uid=generate_uid(entropy_srcs=seed + ["sr"]),
            instance_number=version,
            device_uid=self.settings.device_uid,
            device_name=self.settings.worker.name,
            institution_name=self.settings.worker.institution_name or None,
            previous_sr=previous,
        )
        folder = self.settings.outbox_dir / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sr.SOPInstanceUID}.dcm"
        sr.save_as(path, enforce_file_format=True)
        return path, sr

    def _record_predictions(self, run_id: int, prediction, result: TriageResult) -> None:
        reported = {f.label for f in result.findings}
        rows = [
            {"run_id": run_id, "kind": "diagnosis", "label": label, "probability": float(p),
             "threshold": float(prediction.thresholds[label]), "reported": int(label in reported)}
            for label, p in prediction.diagnosis_probs.items()
        ]
        rows += [{"run_id": run_id, "kind": "priority", "label": k, "probability": float(v), "threshold": None,
                  "reported": 0} for k, v in prediction.priority_probs.items()]
        rows += [{"run_id": run_id, "kind": "referral", "label": k, "probability": float(v), "threshold": None,
                  "reported": int(k in result.referrals)} for k, v in prediction.referral_probs.items()]
        with self.engine.begin() as connection:
            connection.execute(predictions.delete().where(predictions.c.run_id == run_id))
            connection.execute(insert(predictions), rows)
