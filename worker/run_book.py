"""The run book: what every pipeline records about a processing run, from its claim to its delivered SR.

A pipeline (:mod:`worker.pipelines`) decides what a study's result is; the run book does the rest the same way
for all of them: claim the run for one worker (atomically, so duplicate task messages race safely), stamp each
step's time on the run (so the AI turnaround and where the time went can be read from the database), find the
study's image files, write the SR (UIDs derived from the study version: a re-attempt after a crash rewrites
the same SR, never a second), record the scores, and finish: publications, deliveries and the run marked done.
A run that cannot be processed is failed with its reason; a study the input gate turns away is recorded as not
analysed. Delivery is a task of its own (:mod:`worker.delivery`): a PACS that is down delays the SR's arrival,
never the processing of the next study.
"""
from __future__ import annotations

import logging
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import and_, case, insert, or_, select, update
from sqlalchemy.engine import Engine

from pacs_bridge.results import NotAnalysed, TriageResult
from pacs_bridge.routing import is_derived_object
from sql.schema import as_utc, events, instances, predictions, processing_runs, series, studies, utcnow
from worker.config import Settings
from worker.delivery import DeliveryBook
from worker.input_gate import GatePolicy, GateVerdict, assess, series_inputs
from worker.metrics import INPUT_GATE_REFUSALS, RUNS, STAGE_SECONDS, TURNAROUND_SECONDS
from worker.publishing import publish_result

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


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    status: str  # done | not_analysed | duplicate | failed
    sr_path: Path | None = None
    result: TriageResult | NotAnalysed | None = None


@dataclass(frozen=True)
class Score:
    """One score of a run as the ``predictions`` table keeps it (a diagnosis, priority class or referral)."""

    kind: str  # diagnosis | priority | referral
    label: str
    probability: float
    threshold: float | None
    reported: bool


class RunBook:
    """The bookkeeping of processing runs, shared by the pipelines of one worker process."""

    def __init__(self, settings: Settings, engine: Engine, enqueue_delivery: Callable[[int], None],
                 enqueue_publication: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.deliveries = DeliveryBook(settings, engine)
        #: Hands a delivery id to the delivery queue (a Celery task in the service).
        self.enqueue_delivery = enqueue_delivery
        #: Hands a run id to the publication task (the service); None publishes in this process, now.
        self.enqueue_publication = enqueue_publication
        # The run records <worker>:<pid>, so an operator (or a fault test) can tell which process holds it.
        self.host = socket.gethostname()

    def pipeline_of(self, run_id: int) -> str | None:
        """The pipeline the run was routed to (``processing_runs.pipeline``), or None for an unknown run."""
        with self.engine.connect() as connection:
            return connection.execute(select(processing_runs.c.pipeline)
                                      .where(processing_runs.c.id == run_id)).scalar_one_or_none()

    # -- claiming --------------------------------------------------------------------------------------------
    def claim(self, run_id: int, worker_host: str) -> Claimed | None:
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
                        and_(processing_runs.c.status == "running",
                             processing_runs.c.started_at < stale_before)),
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
                        reason=f"run {run_id} abandoned after {row.attempts} attempts "
                               "(worker lost each time?)"))
                return None
            connection.execute(update(studies).where(and_(studies.c.id == row.study_id,
                                                          studies.c.version == row.study_version))
                               .values(status="processing"))
        return Claimed(run_id, row.study_id, row.study_instance_uid, row.study_version)

    def claim_companions(self, first_run_id: int, worker_host: str, wanted: int, wait_s: float = 0.0
                         ) -> list[Claimed]:
        """Up to ``wanted`` other ready runs of the first run's pipeline, claimed, urgent first and none
        starving (routine runs queued longer than ``worker.starvation_after_s`` count as urgent), waiting up
        to ``wait_s`` seconds for them to arrive."""
        if wanted <= 0:
            return []
        deadline = time.monotonic() + wait_s
        starving_before = utcnow() - timedelta(seconds=float(self.settings.worker.starvation_after_s))
        pipeline = self.pipeline_of(first_run_id)
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
                claimed = self.claim(candidate, worker_host)
                if claimed is not None:
                    companions.append(claimed)
            if len(companions) >= wanted or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        return companions

    # -- the run's steps -------------------------------------------------------------------------------------
    def stamp(self, run_id: int, column: str, **values) -> None:
        """Set the run's timestamp ``column`` (``loaded_at``, ``inferred_at``, ``sr_created_at``) to now, with
        other columns of the same step (model name and version, SR UID and path, priority)."""
        with self.engine.begin() as connection:
            connection.execute(update(processing_runs).where(processing_runs.c.id == run_id)
                               .values(**{column: utcnow()}, **values))

    def fail(self, claim: Claimed, exc: Exception, pipeline: str) -> RunOutcome:
        """Record the run and its study as failed, with the reason (the message of a :class:`RunFailed`, else
        the exception's type and message, logged with its traceback) and an error event."""
        reason = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
        log.error("run %d for study %s failed: %s", claim.run_id, claim.study_uid, reason,
                  exc_info=not isinstance(exc, RunFailed))
        with self.engine.begin() as connection:
            connection.execute(update(processing_runs).where(processing_runs.c.id == claim.run_id)
                               .values(status="failed", error=reason, finished_at=utcnow()))
            connection.execute(update(studies).where(and_(studies.c.id == claim.study_id,
                                                          studies.c.version == claim.version))
                               .values(status="failed"))
            connection.execute(insert(events).values(at=utcnow(), kind="error",
                                                     study_instance_uid=claim.study_uid,
                                                     reason=f"run {claim.run_id} failed: {reason}"))
        RUNS.labels(pipeline=pipeline, outcome="failed").inc()
        return RunOutcome(claim.run_id, "failed")

    def image_paths(self, study_id: int) -> dict[str, list[Path]]:
        """The study's image files by Series Instance UID, without derived objects (our SRs, say); raises
        :class:`RunFailed` when it has none."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(series.c.series_instance_uid, series.c.modality, instances.c.sop_class_uid,
                       instances.c.path)
                .select_from(series.join(instances, instances.c.series_id == series.c.id))
                .where(series.c.study_id == study_id)
            ).all()
        paths: dict[str, list[Path]] = defaultdict(list)
        for r in rows:
            if not is_derived_object(r.modality or "", r.sop_class_uid):
                paths[r.series_instance_uid].append(Path(r.path))
        if not paths:
            raise RunFailed("the study has no image instances")
        return dict(paths)

    def write_sr(self, claim: Claimed, result: TriageResult | NotAnalysed,
                 image_paths: dict[str, list[Path]]) -> tuple[Path, Dataset]:
        """The run's SR, written to the outbox: the result with the study's images as evidence, revising the
        SR of the study's previous version if there is one; returns its path and the dataset."""
        from pacs_bridge.sr import build_sr

        evidence = [pydicom.dcmread(p, stop_before_pixels=True)
                    for p in sorted(p for paths in image_paths.values() for p in paths)]
        previous = None
        if claim.version > 1:
            with self.engine.connect() as connection:
                prior = connection.execute(
                    select(processing_runs.c.sr_path)
                    .where(and_(processing_runs.c.study_id == claim.study_id,
                                processing_runs.c.study_version < claim.version,
                                processing_runs.c.sr_path.is_not(None)))
                    .order_by(processing_runs.c.study_version.desc())
                ).first()
            if prior is not None and Path(prior.sr_path).exists():
                previous = pydicom.dcmread(prior.sr_path)
        # Deterministic UIDs per study version: a re-attempt after a crash rewrites the same SR, never a
        # second.
        seed = [self.settings.device_uid, claim.study_uid, str(claim.version)]
        sr = build_sr(
            result, evidence,
            series_instance_uid=generate_uid(entropy_srcs=seed + ["series"]),
            sop_instance_uid=generate_uid(entropy_srcs=seed + ["sr"]),
            instance_number=claim.version,
            device_uid=self.settings.device_uid,
            device_name=self.settings.worker.name,
            institution_name=self.settings.worker.institution_name or None,
            previous_sr=previous,
        )
        folder = self.settings.outbox_dir / claim.study_uid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sr.SOPInstanceUID}.dcm"
        sr.save_as(path, enforce_file_format=True)
        return path, sr

    def record_predictions(self, run_id: int, scores: list[Score]) -> None:
        """The run's scores, replacing any an earlier attempt recorded."""
        rows = [{"run_id": run_id, "kind": s.kind, "label": s.label, "probability": float(s.probability),
                 "threshold": None if s.threshold is None else float(s.threshold),
                 "reported": int(s.reported)}
                for s in scores]
        with self.engine.begin() as connection:
            connection.execute(predictions.delete().where(predictions.c.run_id == run_id))
            if rows:
                connection.execute(insert(predictions), rows)

    def finish(self, claim: Claimed, pipeline: str, result: TriageResult, sr_uid: str, sr_path: Path,
               timings: dict[str, float], scores_by_label: dict[str, float]) -> RunOutcome:
        """After the SR: the worklist publications, the SR's deliveries and the routing rule's forwards after
        processing (decided on ``result`` and ``scores_by_label``), queued; then the run and its study marked
        done, with the timings, and the run's metrics."""
        self._publish(claim.run_id, result)
        delivery_ids = self.deliveries.create(claim.run_id, sr_uid, sr_path)
        # The routing rule's forwards after processing, decided on this result (routing as a router).
        forward_ids = self.deliveries.create_forwards_after(claim.run_id, result, scores_by_label)
        # Queued before the run is marked done: a crash in between redoes the run (same SR, same delivery
        # rows; a delivered row is never sent again), where the other order could leave a delivery never
        # queued.
        for delivery_id in delivery_ids + forward_ids:
            self.enqueue_delivery(delivery_id)
        finished = utcnow()
        with self.engine.begin() as connection:
            connection.execute(update(processing_runs).where(processing_runs.c.id == claim.run_id).values(
                status="done", finished_at=finished, timings=timings,
                # With nowhere to send it, the SR written to the outbox is the delivery.
                delivered_at=None if delivery_ids else finished))
            connection.execute(update(studies).where(and_(studies.c.id == claim.study_id,
                                                          studies.c.version == claim.version))
                               .values(status="done"))
        RUNS.labels(pipeline=pipeline, outcome="done").inc()
        for stage, seconds in timings.items():
            if stage.endswith("_s"):
                STAGE_SECONDS.labels(stage=stage[:-2]).observe(seconds)
        with self.engine.connect() as connection:
            stamps = connection.execute(
                select(processing_runs.c.last_image_at, processing_runs.c.sr_created_at)
                .where(processing_runs.c.id == claim.run_id)).one()
        if stamps.last_image_at is not None and stamps.sr_created_at is not None:
            TURNAROUND_SECONDS.labels(pipeline=pipeline).observe(
                (as_utc(stamps.sr_created_at) - as_utc(stamps.last_image_at)).total_seconds())
        return RunOutcome(claim.run_id, "done", sr_path, result)

    def _publish(self, run_id: int, result: TriageResult) -> None:
        """The run's worklist priority: queued as a retried task of its own in the service (never published
        inside the GPU task); published here and now without a queue (demo, tests). Never raises."""
        if self.enqueue_publication is None:
            publish_result(self.settings, self.engine, run_id, result)
            return
        try:
            self.enqueue_publication(run_id)
        except Exception:  # the broker is down: the SR still goes out; `triage publications retry` later
            log.exception("run %d: the publication task could not be queued", run_id)

    # -- the input gate --------------------------------------------------------------------------------------
    def judge_input(self, claim: Claimed, pipeline: str, headers: dict) -> GateVerdict | None:
        """The input gate's verdict on a run's study (headers by series), or None when the gate is off.

        The required series are the gate's own, or the routing rule's ``expected_series`` (looked up by the
        rule name the run was created under), searched in SeriesDescription as completion searches them.
        """
        gate = self.settings.input_gate
        if not gate.enabled or pipeline not in type(gate).model_fields:
            return None
        policy = GatePolicy.from_config(pipeline, getattr(gate, pipeline).model_dump())
        expected: tuple = ()
        if policy.required_series is None:
            from pacs_bridge.rules import RuleSet

            with self.engine.connect() as connection:
                routing = connection.execute(
                    select(processing_runs.c.routing)
                    .where(processing_runs.c.id == claim.run_id)).scalar_one_or_none()
            rule = RuleSet.from_config(self.settings.routing.model_dump()).rule(str((routing or {}).get("rule") or ""))
            expected = rule.expected_series if rule is not None else ()
        return assess(series_inputs(headers), policy, expected)

    def not_analysed(self, claim: Claimed, pipeline: str, verdict: GateVerdict,
                     image_paths: dict[str, list[Path]], model_name: str, model_version: str) -> RunOutcome:
        """Record a study the input gate turned away: no priority raised, no forward after processing, an
        event, the metric, run status ``not_analysed``, study status "not analysed", and the SR that says why
        (unless ``input_gate.write_sr`` is off), delivered like any result SR."""
        run_id = claim.run_id
        outcome = NotAnalysed(claim.study_uid, pipeline, verdict.reasons, model_name, model_version)
        log.info("run %d study %s v%d (%s): not analysed: %s", run_id, claim.study_uid, claim.version,
                 pipeline, "; ".join(verdict.reasons))
        sr_path, delivery_ids = None, []
        if self.settings.input_gate.write_sr:
            sr_path, sr = self.write_sr(claim, outcome, image_paths)
            self.stamp(run_id, "sr_created_at", sr_sop_instance_uid=str(sr.SOPInstanceUID),
                       sr_path=str(sr_path))
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
