"""Nightly retraining: new ground truth in, a better (and no less fair) model promoted, or a reasoned refusal.

One run (``triage train nightly``, or the Celery beat entry ``triage.train_nightly``):

1. record a ``training_runs`` row; the run's new data are ground-truth labels recorded since the last finished
   run (final and corrected reports, linked to their study; for a study with no final report, the radiologists'
   agree / disagree verdicts on the AI's called findings from the worklist, :func:`collect_feedback_truth`); too
   few new labelled studies and it stops there;
2. take the serving model from the registry (the configured ``model.bundle`` is registered and serves when the
   registry is empty), and make sure every labelled study has a stored embedding under that model's encoder,
   computing the missing ones from the images in the store;
3. split the labelled studies by a hash of their UID: a fixed held-out share (never trained on, night after
   night), a validation share for the thresholds, the rest for training;
4. retrain the heads from the serving model's heads on all training studies so far (checkpointed: a run
   interrupted and started again with the same data resumes and ends the same);
5. evaluate the serving model and the candidate on the held-out studies: AUROC per diagnosis and of priority
   "high", expected calibration error, and the largest TPR/FPR gap between a group of a sensitive attribute
   (``study_attributes``) and the population;
6. write the candidate bundle, register it with its metrics and gates, and promote it only if every gate
   passes; workers pick it up at their next study.
7. ``after_run`` (given by the scheduler: ``worker.commands.jobs``) rebuilds the vector index of prior studies
   (the slice-evidence index, :mod:`worker.slice_evidence`) from its table, compacting what a day of additions and
   deletions left behind.

Gates (``training.gates`` in the configuration) compare the candidate with the serving model on the same
held-out studies: mean AUROC may not drop, no diagnosis's AUROC may drop by more than ``max_label_auroc_drop``,
nor priority's; calibration error may not rise by more than ``max_calibration_increase``; the worst group
disparity may not rise by more than ``max_disparity_increase``, nor the number of TPR/FPR disparities the
fairness analysis (``train.fairness``) flags; and there must be ``min_held_out`` held-out
studies to judge by.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine

from models.backbone import bundle_backbone_id
from models.bundle import LoadedBundle, load_bundle, save_bundle
from models.inference import NoUsableSeries, StudyPredictor
from pacs_bridge.routing import is_derived_object
from sql.embedding_store import load_embeddings, store_embedding
from sql.feedback_schema import ai_feedback
from sql.model_registry import REJECTED, ModelVersion, serving_version
from sql.registry_schema import training_metrics, training_runs
from sql.report_schema import ATTRIBUTES, UNKNOWN, ground_truth_labels, reports, study_attributes
from sql.schema import as_utc, instances, series, studies, utcnow
from train import registry
from train.checkpoint import TrainingInterrupted
from train.evaluation import auroc, aurocs_by_label, expected_calibration_error, worst_group_disparity
from train.fairness.analysis import FairnessConfig, rate_disparities
from train.fairness.cohort import MEASURES, Cohort
from train.fairness.store import link_reports_to_studies
from train.heads_training import HeadData, HeadsTrainingConfig, train_heads
from train.progress import MetricsSink, monitor
from train.triage_table import TriageTable, load_triage_table

log = logging.getLogger(__name__)

FINAL_REPORT_STATUSES = ("F", "C")


@dataclass(frozen=True)
class GateConfig:
    """The promotion gates (``training.gates``; the composition root builds this from the configuration)."""

    max_mean_auroc_drop: float
    max_label_auroc_drop: float
    max_calibration_increase: float
    max_disparity_increase: float
    min_group_units: int
    min_held_out: int


@dataclass(frozen=True)
class NightlyConfig:
    """What one nightly run needs (``training`` and ``model`` in the configuration, read by the composition root:
    ``worker.commands.train_settings.nightly_config``)."""

    models_dir: Path
    work_dir: Path
    seed: int
    held_out_fraction: float
    validation_fraction: float
    min_new_studies: int
    min_training_studies: int
    triage_table: str
    heads: HeadsTrainingConfig
    gates: GateConfig
    configured_bundle: str
    device: str
    study_description: str
    #: The fairness analysis's parameters (``fairness``), for the flagged-disparities gate.
    fairness: FairnessConfig


@dataclass
class NightlyOutcome:
    run_id: int
    status: str  # done | skipped | failed | interrupted
    decision: str = "none"  # promoted | rejected | none
    reason: str = ""
    base_version: str | None = None
    candidate_version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)


# --- data -------------------------------------------------------------------------------------------------------


@dataclass
class StudyTruth:
    labels: dict[str, int]  # diagnosis -> 1 present, 0 absent, -1 uncertain (unmentioned: absent)
    labelled_at: datetime
    #: Only the listed diagnoses are known (radiologists' feedback): unmentioned ones are unknown, not absent.
    partial: bool = False


def collect_ground_truth(connection: Connection) -> dict[str, StudyTruth]:
    """Per study: the labels of its latest final (or corrected) report. Where a label has several sources, a
    person's (``manual:*``) wins over a program's, then the newest."""
    rows = connection.execute(
        select(reports.c.id, reports.c.study_instance_uid, reports.c.reported_at, ground_truth_labels.c.label,
               ground_truth_labels.c.value, ground_truth_labels.c.source, ground_truth_labels.c.created_at)
        .select_from(ground_truth_labels.join(reports, reports.c.id == ground_truth_labels.c.report_id))
        .where(reports.c.status.in_(FINAL_REPORT_STATUSES), reports.c.study_instance_uid.is_not(None))
    ).all()
    latest_report: dict[str, tuple[datetime, int]] = {}
    for r in rows:
        key = (as_utc(r.reported_at), r.id)
        if r.study_instance_uid not in latest_report or key > latest_report[r.study_instance_uid]:
            latest_report[r.study_instance_uid] = key
    chosen: dict[str, dict[str, tuple[tuple, int]]] = defaultdict(dict)
    labelled_at: dict[str, datetime] = {}
    for r in rows:
        if latest_report[r.study_instance_uid][1] != r.id:
            continue
        rank = (r.source.startswith("manual"), as_utc(r.created_at))
        current = chosen[r.study_instance_uid].get(r.label)
        if current is None or rank > current[0]:
            chosen[r.study_instance_uid][r.label] = (rank, int(r.value))
        stamp = as_utc(r.created_at)
        labelled_at[r.study_instance_uid] = max(labelled_at.get(r.study_instance_uid, stamp), stamp)
    return {uid: StudyTruth({k: v for k, (_, v) in labels.items()}, labelled_at[uid])
            for uid, labels in chosen.items()}


def collect_feedback_truth(connection: Connection) -> dict[str, StudyTruth]:
    """Per study, labels from radiologists' verdicts on the AI's called findings (worklist feedback): agree -> 1
    (present), disagree -> 0 (absent). Where radiologists disagree with each other on a finding, the latest verdict
    wins. Priority verdicts give no diagnosis label. Only the judged diagnoses are known (``partial``)."""
    rows = connection.execute(
        select(ai_feedback.c.study_instance_uid, ai_feedback.c.label, ai_feedback.c.verdict,
               ai_feedback.c.created_at)
        .where(ai_feedback.c.target == "finding", ai_feedback.c.ai_value == "present")
        .order_by(ai_feedback.c.created_at, ai_feedback.c.id)).all()
    labels: dict[str, dict[str, int]] = defaultdict(dict)
    labelled_at: dict[str, datetime] = {}
    for r in rows:
        labels[r.study_instance_uid][r.label] = 1 if r.verdict == "agree" else 0
        labelled_at[r.study_instance_uid] = as_utc(r.created_at)
    return {uid: StudyTruth(found, labelled_at[uid], partial=True) for uid, found in labels.items()}


def collect_truth(connection: Connection) -> dict[str, StudyTruth]:
    """Final reports' labels, and radiologists' feedback for the studies that have no final report."""
    truth = collect_ground_truth(connection)
    for uid, feedback in collect_feedback_truth(connection).items():
        truth.setdefault(uid, feedback)
    return truth


def split_of(study_uid: str, seed: int, held_out_fraction: float, validation_fraction: float) -> str:
    """"held_out", "validation" or "train". The held-out share depends on the UID only, so a study held out
    once is held out every night; validation is drawn from the rest with the seed."""
    def unit(text: str) -> float:
        return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / float(1 << 48)

    if unit(f"held-out:{study_uid}") < held_out_fraction:
        return "held_out"
    return "validation" if unit(f"validation:{seed}:{study_uid}") < validation_fraction else "train"


def _study_files(connection: Connection, study_uid: str) -> dict[str, list[str]]:
    rows = connection.execute(
        select(series.c.series_instance_uid, series.c.modality, instances.c.sop_class_uid, instances.c.path)
        .select_from(studies.join(series, series.c.study_id == studies.c.id)
                     .join(instances, instances.c.series_id == series.c.id))
        .where(studies.c.study_instance_uid == study_uid)
    ).all()
    files: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if not is_derived_object(r.modality or "", r.sop_class_uid) and Path(r.path).exists():
            files[r.series_instance_uid].append(r.path)
    return dict(files)


def ensure_embeddings(engine: Engine, bundle: LoadedBundle, study_uids: list[str], config: NightlyConfig,
                      console: Console | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Stored embeddings of ``study_uids`` under the bundle's encoder, computing missing ones from the images
    in the store. Returns (embeddings, {study uid: why it has none})."""
    backbone = bundle_backbone_id(bundle)
    with engine.connect() as connection:
        stored = load_embeddings(connection, backbone, study_uids)
    missing = [uid for uid in study_uids if uid not in stored]
    skipped: dict[str, str] = {}
    if missing:
        predictor = StudyPredictor(bundle, device=config.device, study_description=config.study_description)
        with monitor(console, "embeddings", "Study embeddings from stored images", len(missing)) as progress:
            for uid in missing:
                with engine.connect() as connection:
                    files = _study_files(connection, uid)
                if not files:
                    skipped[uid] = "no images in the store"
                else:
                    try:
                        prediction = predictor.predict_files(files)
                        store_embedding(engine, uid, backbone, prediction.embedding, bundle.version, "nightly")
                        stored[uid] = prediction.embedding
                    except NoUsableSeries as error:
                        skipped[uid] = str(error)
                progress.advance(status=uid[-12:])
    return stored, skipped


def _groups(connection: Connection, study_uids: list[str]) -> dict[str, np.ndarray]:
    rows = {r.study_instance_uid: r for r in connection.execute(
        select(study_attributes).where(study_attributes.c.study_instance_uid.in_(study_uids)))}
    return {attribute: np.array([getattr(rows[u], attribute) if u in rows else UNKNOWN for u in study_uids],
                                dtype=object) for attribute in ATTRIBUTES}


# --- evaluation and gates ---------------------------------------------------------------------------------------


def evaluate_model(prima, embeddings: torch.Tensor, diagnosis: np.ndarray, priority: np.ndarray,
                   groups: Mapping[str, np.ndarray], gates: GateConfig, fairness: FairnessConfig) -> dict[str, Any]:
    """Held-out measures of one model: AUROC per diagnosis and mean, priority AUROC, calibration, disparity."""
    with torch.inference_mode():
        output = prima.heads(embeddings)
    margins = output.diagnosis_logits.numpy()
    by_label = aurocs_by_label(margins, diagnosis, prima.diagnosis_names)
    columns = [prima.diagnosis_names.index(n) for n in by_label]
    known = ~np.isnan(diagnosis[:, columns])
    probabilities = torch.sigmoid(output.diagnosis_logits).numpy()[:, columns]
    high = prima.priority_classes.index("high")
    p_high = torch.softmax(output.priority_logits, dim=1)[:, high].numpy()
    disparity = worst_group_disparity(margins > 0, diagnosis, groups, gates.min_group_units)
    # Single attributes only, with the gate's group size: held-out sets are small.
    analysis = replace(fairness, min_group_units=gates.min_group_units, attributes=ATTRIBUTES, intersections=())
    flagged = flagged_disparities(margins > 0, diagnosis, groups, prima.diagnosis_names, analysis)
    return {
        "auroc_by_label": by_label,
        "mean_auroc": float(np.mean(list(by_label.values()))) if by_label else None,
        "priority_auroc": auroc(p_high, priority == high),
        "calibration_error": expected_calibration_error(probabilities[known], diagnosis[:, columns][known]),
        "worst_disparity": max(float(disparity["tpr"]), float(disparity["fpr"])),
        "disparity": disparity,
        "flagged_disparities": flagged,
        "n": len(embeddings),
    }


def flagged_disparities(called: np.ndarray, truth: np.ndarray, groups: Mapping[str, np.ndarray],
                        names: tuple[str, ...], config: FairnessConfig) -> int:
    """How many TPR/FPR disparities the fairness analysis (:mod:`train.fairness.analysis`: diagnosis-matched
    bootstrap, exact test, corrected p-values) flags for these calls on these studies."""
    n = len(called)
    cohort = Cohort(
        study_uids=np.array([f"held-out-{i}" for i in range(n)], dtype=object),
        attributes={a: np.asarray(groups.get(a, np.full(n, UNKNOWN, dtype=object)), dtype=object)
                    for a in ATTRIBUTES},
        durations={m: np.full(n, np.nan) for m in MEASURES}, exam_at=np.full(n, np.nan),
        reported=np.ones(n, dtype=bool), diagnoses=tuple(names),
        truth=np.where(np.isnan(truth), -1, truth).astype(np.int8), predicted=np.asarray(called, dtype=bool),
        as_of=0.0, source="nightly held-out",
    )
    return sum(row.flagged for row in rate_disparities(cohort, config))


def gate_candidate(candidate: Mapping[str, Any], current: Mapping[str, Any], gates: GateConfig) -> dict[str, Any]:
    """Each gate's verdict: {"passed", "value", "limit", "reason"}."""
    verdicts: dict[str, Any] = {}

    def verdict(name: str, passed: bool, value: Any, limit: Any, reason: str) -> None:
        verdicts[name] = {"passed": bool(passed), "value": value, "limit": limit, "reason": reason}

    n = int(candidate["n"])
    verdict("held_out_size", n >= gates.min_held_out, n, gates.min_held_out,
            f"{n} held-out studies (at least {gates.min_held_out} needed to judge)")
    cand, cur = candidate.get("mean_auroc"), current.get("mean_auroc")
    if cand is None:
        verdict("mean_auroc", False, None, None, "no diagnosis has positive and negative held-out studies")
    else:
        limit = None if cur is None else cur - gates.max_mean_auroc_drop
        verdict("mean_auroc", limit is None or cand >= limit - 1e-9, cand, limit,
                f"mean AUROC {cand:.3f} vs serving {'n/a' if cur is None else f'{cur:.3f}'}")
    drops = {name: current["auroc_by_label"][name] - value for name, value in candidate["auroc_by_label"].items()
             if name in current["auroc_by_label"]}
    worst = max(drops.items(), key=lambda kv: kv[1], default=(None, 0.0))
    verdict("label_auroc", worst[1] <= gates.max_label_auroc_drop + 1e-9, round(worst[1], 4),
            gates.max_label_auroc_drop, f"largest AUROC drop {worst[1]:.3f}" + (f" ({worst[0]})" if worst[0] else ""))
    cand_p, cur_p = candidate.get("priority_auroc"), current.get("priority_auroc")
    if cand_p is not None and cur_p is not None:
        verdict("priority_auroc", cand_p >= cur_p - gates.max_label_auroc_drop - 1e-9, cand_p,
                cur_p - gates.max_label_auroc_drop, f"priority AUROC {cand_p:.3f} vs serving {cur_p:.3f}")
    cand_c, cur_c = candidate.get("calibration_error"), current.get("calibration_error")
    if cand_c is not None:
        limit = None if cur_c is None else cur_c + gates.max_calibration_increase
        verdict("calibration", limit is None or cand_c <= limit + 1e-9, cand_c, limit,
                f"expected calibration error {cand_c:.3f} vs serving {'n/a' if cur_c is None else f'{cur_c:.3f}'}")
    cand_d, cur_d = candidate["worst_disparity"], current["worst_disparity"]
    limit = cur_d + gates.max_disparity_increase
    verdict("fairness", cand_d <= limit + 1e-9, round(cand_d, 4), round(limit, 4),
            f"largest group TPR/FPR gap {cand_d:.3f} vs serving {cur_d:.3f}")
    cand_f, cur_f = candidate.get("flagged_disparities"), current.get("flagged_disparities")
    if cand_f is not None and cur_f is not None:
        verdict("flagged_disparities", cand_f <= cur_f, cand_f, cur_f,
                f"{cand_f} TPR/FPR disparities flagged by the fairness analysis vs {cur_f} for the serving model")
    return verdicts


# --- the run ----------------------------------------------------------------------------------------------------


def _db_sink(engine: Engine, run_id: int) -> MetricsSink:
    def sink(stage: str, step: int, metrics: Mapping[str, float]) -> None:
        rows = [{"run_id": run_id, "stage": stage, "step": step, "name": k, "value": float(v), "at": utcnow()}
                for k, v in metrics.items() if v is not None and np.isfinite(v)]
        if rows:
            with engine.begin() as connection:
                connection.execute(insert(training_metrics), rows)
    return sink


def _last_window_end(connection: Connection) -> datetime | None:
    row = connection.execute(
        select(training_runs.c.until).where(training_runs.c.kind == "nightly", training_runs.c.status == "done")
        .order_by(training_runs.c.id.desc())
    ).first()
    return None if row is None or row.until is None else as_utc(row.until)


def _finish(engine: Engine, outcome: NightlyOutcome, **values: Any) -> NightlyOutcome:
    with engine.begin() as connection:
        connection.execute(update(training_runs).where(training_runs.c.id == outcome.run_id).values(
            status=outcome.status, decision=outcome.decision, finished_at=utcnow(),
            base_version=outcome.base_version, candidate_version=outcome.candidate_version,
            result={"reason": outcome.reason, "metrics": outcome.metrics, "gates": outcome.gates}, **values))
    log.info("nightly run %d: %s, %s (%s)", outcome.run_id, outcome.status, outcome.decision, outcome.reason)
    return outcome


def serving_bundle(engine: Engine, config: NightlyConfig) -> ModelVersion:
    """The serving version; the configured bundle is registered and promoted when the registry is empty."""
    serving = serving_version(engine)
    if serving is not None:
        return serving
    if not config.configured_bundle:
        raise registry.RegistryError("no model serves: the registry is empty and model.bundle is not configured")
    version = registry.register_bundle(engine, config.configured_bundle, notes="the configured model.bundle")
    return registry.promote(engine, version.version, actor="configuration",
                            reason="first nightly run: the configured model.bundle serves until a candidate beats it")


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_nightly(
    engine: Engine,
    config: NightlyConfig,
    console: Console | None = None,
    now: datetime | None = None,
    should_stop: Callable[[int], bool] | None = None,
    candidate_hook: Callable[[Any], None] | None = None,
    after_run: Callable[[NightlyOutcome], None] | None = None,
) -> NightlyOutcome:
    """One nightly run (see the module docstring). ``candidate_hook(prima)`` may alter the trained candidate
    before it is evaluated (tests plant a worse one with it); ``after_run(outcome)`` runs last, whatever the
    outcome (its failure is logged, never the run's)."""
    outcome = _run_recorded(engine, config, console, now, should_stop, candidate_hook)
    if after_run is not None:
        try:
            after_run(outcome)
        except Exception:  # maintenance after the run must not turn a good run into a failed one
            log.exception("after nightly run %d", outcome.run_id)
    return outcome


def _run_recorded(engine: Engine, config: NightlyConfig, console: Console | None, now: datetime | None,
                  should_stop, candidate_hook) -> NightlyOutcome:
    until = now or utcnow()
    with engine.begin() as connection:
        since = _last_window_end(connection)
        run_id = connection.execute(insert(training_runs).values(
            kind="nightly", status="running", started_at=utcnow(), seed=config.seed, since=since, until=until,
            parameters=json.loads(json.dumps(asdict(config), default=str)),
        )).inserted_primary_key[0]
    outcome = NightlyOutcome(run_id, "running")
    try:
        return _run(engine, config, outcome, since, until, console, should_stop, candidate_hook)
    except TrainingInterrupted as stop:
        outcome.status, outcome.reason = "interrupted", str(stop)
        return _finish(engine, outcome)
    except Exception as error:
        log.exception("nightly run %d failed", run_id)
        outcome.status, outcome.reason = "failed", f"{type(error).__name__}: {error}"
        return _finish(engine, outcome, error=outcome.reason)


@dataclass
class StudySplits:
    """The labelled studies with embeddings, by a hash of their UID (:func:`split_of`)."""

    train: list[str]
    validation: list[str]
    held_out: list[str]


def new_ground_truth(engine: Engine, since: datetime | None, until: datetime
                     ) -> tuple[dict[str, StudyTruth], list[str]]:
    """Stage 1: every study's ground truth labelled by ``until`` (reports linked to their studies first), and
    the studies whose truth is new since ``since``."""
    with engine.begin() as connection:
        link_reports_to_studies(connection)
        truth = {uid: t for uid, t in collect_truth(connection).items() if t.labelled_at <= until}
    new = [uid for uid, t in truth.items() if since is None or t.labelled_at > since]
    return truth, new


def split_studies(study_uids: list[str], config: NightlyConfig) -> StudySplits:
    """Stage 3: training, validation and held-out studies (held-out ones the same every night)."""
    splits = {u: split_of(u, config.seed, config.held_out_fraction, config.validation_fraction) for u in study_uids}
    return StudySplits(train=[u for u in study_uids if splits[u] == "train"],
                       validation=[u for u in study_uids if splits[u] == "validation"],
                       held_out=[u for u in study_uids if splits[u] == "held_out"])


def head_data(study_uids: list[str], truth: Mapping[str, StudyTruth], embeddings: Mapping[str, np.ndarray],
              names: tuple[str, ...], table: TriageTable) -> HeadData:
    """The heads' inputs and targets for ``study_uids``: diagnoses from the truth (NaN where unknown: uncertain
    labels, and every diagnosis a feedback-only study was not judged on), priority and referral from the triage
    table."""
    diagnosis = np.zeros((len(study_uids), len(names)), dtype=np.float32)
    index = {n: i for i, n in enumerate(names)}
    for row, uid in enumerate(study_uids):
        if truth[uid].partial:  # feedback: only the judged diagnoses are known
            diagnosis[row] = np.nan
        for label, value in truth[uid].labels.items():
            if label in index:
                diagnosis[row, index[label]] = np.nan if value < 0 else float(value)
    priority, referral = table.targets(np.nan_to_num(diagnosis, nan=0.0), names)
    vectors = torch.from_numpy(np.stack([embeddings[u] for u in study_uids])) if study_uids else torch.zeros(0)
    return HeadData(vectors, diagnosis, priority, referral)


def evaluate_on_held_out(engine: Engine, serving_prima, candidate_prima, held_out: HeadData,
                         held_out_uids: list[str], config: NightlyConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 5: the serving model's and the candidate's held-out measures (serving, candidate)."""
    if not len(held_out):
        empty = {"auroc_by_label": {}, "mean_auroc": None, "priority_auroc": None, "calibration_error": None,
                 "worst_disparity": 0.0, "disparity": {}, "flagged_disparities": 0, "n": 0}
        return empty, dict(empty)
    with engine.connect() as connection:
        groups = _groups(connection, held_out_uids)
    return tuple(evaluate_model(prima, held_out.embeddings, held_out.diagnosis, held_out.priority, groups,
                                config.gates, config.fairness)
                 for prima in (serving_prima, candidate_prima))  # type: ignore[return-value]


def write_candidate(engine: Engine, config: NightlyConfig, outcome: NightlyOutcome, base: LoadedBundle,
                    candidate: LoadedBundle, table: TriageTable, splits: StudySplits, until: datetime,
                    metrics: dict[str, Any], gates: dict[str, Any]) -> str:
    """Stage 6: the candidate bundle written to the models folder and registered with its metrics and gates;
    returns its version."""
    stamp = until.astimezone(UTC).strftime("%Y%m%d-%H%M")
    version = f"{base.config_name}-nightly-{stamp}-run{outcome.run_id}"
    folder = config.models_dir / version
    meta = {k: v for k, v in base.manifest.items()
            if k in ("provenance", "clinical_use", "backbone_id", "training", "calibration")}
    meta.update(
        version=version, parent_version=outcome.base_version, backbone_id=bundle_backbone_id(base),
        triage_table=table.to_manifest(),
        notes=(f"heads retrained nightly (run {outcome.run_id}) from {outcome.base_version} on "
               f"{len(splits.train)} labelled studies; thresholds on {len(splits.validation)} validation studies"),
        nightly={"run_id": outcome.run_id, "held_out_metrics": metrics["candidate"], "gates": gates},
    )
    if folder.exists():
        shutil.rmtree(folder)
    save_bundle(folder, candidate.vqvae, candidate.prima, meta, text=candidate.text)
    registry.register_bundle(engine, folder, metrics=metrics, gates=gates, training_run_id=outcome.run_id,
                             parent_version=outcome.base_version)
    return version


def decide(engine: Engine, outcome: NightlyOutcome, version: str, gates: dict[str, Any]) -> None:
    """Stage 7: promote the candidate when every gate passed, otherwise mark it rejected, with the reasons."""
    if all(g["passed"] for g in gates.values()):
        registry.promote(engine, version, actor="nightly", reason=f"nightly run {outcome.run_id}: every gate passed")
        outcome.decision = "promoted"
        outcome.reason = "all gates passed: " + gates["mean_auroc"]["reason"]
    else:
        registry.set_status(engine, version, REJECTED)
        outcome.decision = "rejected"
        outcome.reason = "; ".join(f"{name}: {g['reason']}" for name, g in gates.items() if not g["passed"])


def _run(engine: Engine, config: NightlyConfig, outcome: NightlyOutcome, since: datetime | None,
         until: datetime, console: Console | None, should_stop, candidate_hook) -> NightlyOutcome:
    started = time.perf_counter()
    truth, new = new_ground_truth(engine, since, until)
    if len(new) < config.min_new_studies:
        outcome.status = "skipped"
        outcome.reason = (f"{len(new)} studies with new ground truth since "
                          f"{since.isoformat() if since else 'the beginning'}; {config.min_new_studies} needed")
        return _finish(engine, outcome, n_new_studies=len(new))

    # Stage 2: the serving model, and an embedding under its encoder for every labelled study.
    serving = serving_bundle(engine, config)
    outcome.base_version = serving.version
    base = load_bundle(serving.bundle_path)
    embeddings, without = ensure_embeddings(engine, base, sorted(truth), config, console)
    splits = split_studies([u for u in sorted(truth) if u in embeddings], config)
    counts = {"n_new_studies": len(new), "n_train": len(splits.train), "n_held_out": len(splits.held_out)}
    if len(splits.train) < config.min_training_studies:
        outcome.status = "skipped"
        outcome.reason = (f"{len(splits.train)} training studies with embeddings ({len(without)} without images); "
                          f"{config.min_training_studies} needed")
        return _finish(engine, outcome, **counts)

    # Stage 4: retrain the heads from the serving model's, checkpointed under the fingerprint of their data.
    names = base.prima.diagnosis_names
    table = load_triage_table(config.triage_table or None, names, base.priority_classes, base.referral_names)
    training, validation, held_out = (head_data(uids, truth, embeddings, names, table)
                                      for uids in (splits.train, splits.validation, splits.held_out))
    if len(validation) == 0:
        validation = training
    fingerprint = _fingerprint(serving.version, splits.train, splits.validation, training.diagnosis.tolist(),
                               asdict(config.heads))
    checkpoint = config.work_dir / "nightly" / fingerprint / "heads.pt"
    with engine.begin() as connection:
        connection.execute(update(training_runs).where(training_runs.c.id == outcome.run_id).values(
            checkpoint=str(checkpoint), base_version=serving.version, **counts))
    candidate_model = load_bundle(serving.bundle_path)  # the heads start from the serving model's
    sink = _db_sink(engine, outcome.run_id)
    report = train_heads(candidate_model.prima, training, validation, replace(config.heads, seed=config.seed),
                         checkpoint, console, sink, should_stop)
    if candidate_hook is not None:
        candidate_hook(candidate_model.prima)

    current_metrics, candidate_metrics = evaluate_on_held_out(engine, base.prima, candidate_model.prima, held_out,
                                                              splits.held_out, config)
    gates = gate_candidate(candidate_metrics, current_metrics, config.gates)
    sink("evaluation", 0, {f"candidate_{k}": v for k, v in candidate_metrics.items() if isinstance(v, float)})
    sink("evaluation", 0, {f"serving_{k}": v for k, v in current_metrics.items() if isinstance(v, float)})

    metrics = {"candidate": candidate_metrics, "serving": current_metrics, "serving_version": serving.version,
               "validation_auroc": report.validation_auroc, "positives": report.positives, **counts,
               "seconds": round(time.perf_counter() - started, 1)}
    metrics = json.loads(json.dumps(metrics, default=float))
    version = write_candidate(engine, config, outcome, base, candidate_model, table, splits, until, metrics, gates)
    outcome.candidate_version, outcome.metrics, outcome.gates = version, metrics, gates
    decide(engine, outcome, version, gates)
    outcome.status = "done"
    shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return _finish(engine, outcome, **counts)
