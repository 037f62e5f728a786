"""The ``slice_knn`` pipeline: studies Prima does not cover (CR, DX, CT) get the findings of their most
similar prior studies.

One run: slices -> MedImageInsight embeddings -> the ``k`` nearest prior studies of the study's partition ->
kNN findings (similarity-weighted votes of the neighbours with a final report) and their evidence, with
zero-shot findings beside them where configured -> SR and deliveries through the run book
(:mod:`worker.run_book`), so a slice_knn run is idempotent, timed and delivered exactly as a neuro_mri run is.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

from sqlalchemy import insert

from pacs_bridge.results import PRIORITIES, Finding, TriageResult
from sql.schema import events, utcnow
from worker.config import Settings
from worker.input_gate import read_headers
from worker.run_book import Claimed, RunBook, RunFailed, RunOutcome, Score
from worker.slice_evidence import evidence_for, study_partition
from worker.zero_shot import add_slice_zero_shot

#: The pipeline's name in routing rules, ``processing_runs.pipeline`` and the metrics.
PIPELINE = "slice_knn"
#: The model name a slice_knn result and its SR carry.
MODEL_NAME = "medimageinsight-knn"

log = logging.getLogger(__name__)


def knn_result(study_uid: str, neighbours: list, settings: Settings,
               model_version: str) -> tuple[TriageResult, dict[str, float]]:
    """The kNN findings (scores of the labels the voting neighbours carry that the SR code table knows) as a
    result, and every label's score."""
    from models.knn import label_scores
    from pacs_bridge.codes import DIAGNOSIS_CODES

    cfg = settings.slice_evidence
    scores = label_scores(neighbours, k=int(cfg.k))
    threshold = float(cfg.finding_threshold)
    # Only labels the SR can code become findings; the others are still scored (predictions table).
    ranked = sorted((label for label in scores if label in DIAGNOSIS_CODES),
                    key=lambda label: (-scores[label], label))
    reported = [label for label in ranked if scores[label] >= threshold]
    for label in ranked:
        if len(reported) >= max(int(settings.model.report_top_k), 1):
            break
        if label not in reported:
            reported.append(label)
    findings = tuple(Finding(label=label, probability=min(max(scores[label], 0.0), 1.0), threshold=threshold)
                     for label in sorted(reported, key=lambda name: (-scores[name], name)))
    # Labels the site has the model rule out: reported as explicitly absent when below the threshold.
    findings += tuple(Finding(label=label, probability=min(max(scores.get(label, 0.0), 0.0), 1.0),
                              threshold=threshold, reported_absent=True)
                      for label in settings.model.report_absent
                      if label in DIAGNOSIS_CODES and label not in reported
                      and scores.get(label, 0.0) < threshold)
    levels = [cfg.priority_of_findings.get(f.label, "routine") for f in findings if f.positive]
    for level in levels:
        if level not in PRIORITIES:
            raise ValueError(f"slice_evidence.priority_of_findings: {level!r} is not one of {PRIORITIES}")
    priority = max(levels, key=PRIORITIES.index, default="routine")
    return TriageResult(study_instance_uid=study_uid, priority=priority, findings=findings,
                        model_name=MODEL_NAME, model_version=model_version), scores


class SliceKnnPipeline:
    """The slice_knn pipeline of one worker process; the embedder and the index books are the run book's slice
    evidence (:func:`worker.slice_evidence.evidence_for`), loaded once."""

    def __init__(self, book: RunBook) -> None:
        self.book = book

    def process(self, run_id: int, worker_name: str | None = None) -> RunOutcome:
        """Process run ``run_id`` alone; ``worker_name`` (the Celery node name) is recorded with the pid as
        who ran it."""
        claim = self.book.claim(run_id, f"{worker_name or self.book.host}:{os.getpid()}")
        if claim is None:
            return RunOutcome(run_id, "duplicate")
        try:
            return self._run(claim)
        except Exception as exc:  # recorded on the run, and the worker goes on with the next
            return self.book.fail(claim, exc, PIPELINE)

    def _run(self, claim: Claimed) -> RunOutcome:
        book, settings = self.book, self.book.settings
        timings: dict[str, float] = {}
        image_paths = book.image_paths(claim.study_id)
        evidence = evidence_for(book)
        if evidence is None:
            raise RunFailed("slice_knn needs slice_evidence enabled with its weights "
                            "(slice_evidence.weights)")
        headers = read_headers(image_paths)
        verdict = book.judge_input(claim, PIPELINE, headers)
        if verdict is not None and not verdict.adequate:
            return book.not_analysed(claim, PIPELINE, verdict, image_paths, MODEL_NAME,
                                     evidence.model_version)
        book.stamp(claim.run_id, "loaded_at", model_name=MODEL_NAME, model_version=evidence.model_version)
        try:
            found = evidence.process_study(claim.study_uid, claim.run_id, image_paths, timings,
                                           partition=study_partition(headers))
        except ValueError as exc:
            raise RunFailed(str(exc)) from exc
        book.stamp(claim.run_id, "inferred_at")
        result, scores = knn_result(claim.study_uid, found.neighbours, settings, evidence.model_version)
        result = dataclasses.replace(result, similar_studies=found.similar)
        # zero-shot findings beside the kNN (zero_shot.enabled)
        result = add_slice_zero_shot(evidence, result, found.study_vector, found.neighbours, scores)
        t0 = time.perf_counter()
        sr_path, sr = book.write_sr(claim, result, image_paths)
        timings["sr_s"] = time.perf_counter() - t0
        book.stamp(claim.run_id, "sr_created_at", sr_sop_instance_uid=str(sr.SOPInstanceUID),
                   sr_path=str(sr_path), priority=result.priority)
        reported = {f.label for f in result.findings}
        threshold = float(settings.slice_evidence.finding_threshold)
        book.record_predictions(claim.run_id, [
            Score("diagnosis", label, float(score), threshold, label in reported)
            for label, score in scores.items()])
        if not found.neighbours or all(n.labels is None for n in found.neighbours):
            with book.engine.begin() as connection:
                connection.execute(insert(events).values(
                    at=utcnow(), kind="slice_knn", study_instance_uid=claim.study_uid,
                    reason=f"run {claim.run_id}: no neighbour with a final report; evidence only"))
        timings["slice_series"], timings["slice_count"] = found.n_series, found.n_slices
        outcome = book.finish(claim, PIPELINE, result, str(sr.SOPInstanceUID), sr_path, timings, scores)
        log.info("run %d study %s v%d (slice_knn): priority %s, %d findings, %d similar studies",
                 claim.run_id, claim.study_uid, claim.version, result.priority, len(result.findings),
                 len(result.similar_studies))
        return outcome
