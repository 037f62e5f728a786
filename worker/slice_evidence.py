"""Slice evidence: similar prior studies from MedImageInsight slice embeddings, and the ``slice_knn`` pipeline.

At processing time a study's image series are embedded (an evenly spaced subset of slices per series; series
and study embeddings by median), the study-level index is searched for the ``evidence_k`` most similar *other*
studies, and the study's vectors are stored (``slice_embeddings`` rows, then the faiss index). The evidence,
each prior study with its similarity and its confirmed findings (labels of its latest final report), goes into
``TriageResult.similar_studies`` and so into the SR.

* ``neuro_mri``: :func:`add_slice_evidence` is the one call :mod:`worker.pipeline` makes after building the Prima
  result; evidence that cannot be computed is logged and the result goes out without it.
* ``slice_knn`` (CR, DX, CT: studies Prima does not cover): :class:`SliceKnnProcessor` processes the run alone,
  its findings the kNN scores of the ``k`` neighbours with a final report (similarity-weighted votes).

The faiss index file is a cache of the ``slice_embeddings`` table: each worker process syncs its index from the
table before searching (new rows are added; a count that no longer matches, after a deletion elsewhere, rebuilds
it), so several workers can add studies without losing each other's. ``triage index rebuild|delete|stats``
maintain it.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections import defaultdict
from pathlib import Path

import numpy as np
from sqlalchemy import and_, delete, func, insert, select, update

from pacs_bridge.results import PRIORITIES, Finding, SimilarStudy, TriageResult
from pacs_bridge.routing import is_derived_object
from pacs_bridge.schema import events, instances, predictions, processing_runs, series, studies, utcnow
from pacs_bridge.slice_index_schema import slice_embeddings
from worker.config import Settings

log = logging.getLogger(__name__)

PIPELINE = "slice_knn"
FINAL_REPORT_STATUSES = ("F", "C")


def model_key(settings: Settings) -> str:
    """Which model made a vector: the configuration and the weights file's name."""
    cfg = settings.slice_evidence
    weights = Path(cfg.weights).name if cfg.weights else "random-seed0"
    return f"medimageinsight-{cfg.config}:{weights}"[:128]


def index_path(settings: Settings) -> Path:
    configured = settings.slice_evidence.index_path
    return Path(configured) if configured else settings.var_dir / "index" / "slices.faiss"


def _settings_dim(settings: Settings) -> int:
    from models.medimageinsight import CONFIGS

    return CONFIGS[settings.slice_evidence.config].projection_dim


# -- the index and its table ---------------------------------------------------------------------------------------
class SliceIndexBook:
    """The study-level vector index of one model and one partition (modality and body region, e.g. ``MR-HEAD``),
    kept in step with the ``slice_embeddings`` table. Studies are searched only within their own partition."""

    def __init__(self, settings: Settings, engine, model: str | None = None, dim: int | None = None,
                 partition: str = "") -> None:
        from models.vector_index import IndexSettings, partition_path

        self.settings, self.engine = settings, engine
        self.partition = partition
        self.model = model or model_key(settings)
        self.dim = dim or _settings_dim(settings)
        cfg = settings.slice_evidence
        self.index_settings = IndexSettings(exact_max=int(cfg.exact_max), approximate=cfg.approximate,
                                            nprobe=int(cfg.nprobe))
        self.path = partition_path(index_path(settings), partition)
        self._index = None
        self._last_id = 0

    def _study_rows(self, after_id: int = 0):
        with self.engine.connect() as connection:
            return connection.execute(
                select(slice_embeddings.c.id, slice_embeddings.c.vector)
                .where(and_(slice_embeddings.c.model == self.model,
                            slice_embeddings.c.series_instance_uid.is_(None),
                            slice_embeddings.c.index_partition == self.partition,
                            slice_embeddings.c.id > after_id))
                .order_by(slice_embeddings.c.id)
            ).all()

    def _count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(
                select(func.count()).select_from(slice_embeddings)
                .where(and_(slice_embeddings.c.model == self.model,
                            slice_embeddings.c.index_partition == self.partition,
                            slice_embeddings.c.series_instance_uid.is_(None)))).scalar_one())

    def _vectors(self, rows) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        vectors = np.stack([np.frombuffer(r.vector, dtype="<f4") for r in rows]).astype(np.float32)
        return vectors, np.array([r.id for r in rows], np.int64)

    def rebuild(self) -> int:
        """The index made anew from the table (kind by size), saved; returns the number of studies in it."""
        from models.vector_index import VectorIndex

        rows = self._study_rows()
        vectors, ids = self._vectors(rows)
        self._index = VectorIndex.build(self.dim, vectors, ids, self.index_settings)
        self._last_id = int(ids.max()) if len(ids) else 0
        self._index.save(self.path)
        return len(ids)

    def index(self):
        """The index, loaded (or rebuilt) once and synced with the table on every call."""
        from models.vector_index import IndexError_, VectorIndex

        if self._index is None:
            try:
                self._index = VectorIndex.load(self.path, dim=self.dim)
                _, ids = self._index.vectors_and_ids()
                self._last_id = int(ids.max()) if len(ids) else 0
            except IndexError_ as exc:
                log.info("slice index: %s; rebuilding from the database", exc)
                self.rebuild()
                return self._index
        new = self._study_rows(self._last_id)
        if new:
            vectors, ids = self._vectors(new)
            self._index.add(vectors, ids)
            self._last_id = int(ids.max())
        if len(self._index) != self._count():
            self.rebuild()  # rows deleted (or replaced) by another process
        return self._index

    def neighbours(self, vector: np.ndarray, k: int, exclude_study: str | None = None) -> list[tuple[str, float]]:
        """The k most similar studies (uid, similarity), most similar first, without ``exclude_study``."""
        index = self.index()
        if len(index) == 0 or k <= 0:
            return []
        sims, ids = index.search(vector[None, :], min(k + 1, len(index)))
        found = [(int(i), float(s)) for i, s in zip(ids[0], sims[0]) if i >= 0]
        with self.engine.connect() as connection:
            uid_of = dict(connection.execute(
                select(slice_embeddings.c.id, slice_embeddings.c.study_instance_uid)
                .where(slice_embeddings.c.id.in_([i for i, _ in found]))).all())
        out = [(uid_of[i], s) for i, s in found if i in uid_of and uid_of[i] != exclude_study]
        return out[:k]

    def add_study(self, study_uid: str, run_id: int | None, study_vector: np.ndarray,
                  series_vectors: dict[str, tuple[np.ndarray, int]]) -> int:
        """Store a study's vectors (replacing its earlier ones for this model); returns the study row's id."""
        now = utcnow()
        n_slices = sum(n for _, n in series_vectors.values())
        with self.engine.begin() as connection:
            connection.execute(delete(slice_embeddings).where(and_(
                slice_embeddings.c.study_instance_uid == study_uid, slice_embeddings.c.model == self.model)))
            rows = [{"study_instance_uid": study_uid, "series_instance_uid": uid, "run_id": run_id,
                     "model": self.model, "index_partition": self.partition, "dim": self.dim, "n_slices": n,
                     "vector": np.asarray(v, "<f4").tobytes(), "created_at": now}
                    for uid, (v, n) in series_vectors.items()]
            if rows:
                connection.execute(insert(slice_embeddings), rows)
            study_id = connection.execute(insert(slice_embeddings).values(
                study_instance_uid=study_uid, series_instance_uid=None, run_id=run_id, model=self.model,
                index_partition=self.partition, dim=self.dim, n_slices=n_slices,
                vector=np.asarray(study_vector, "<f4").tobytes(), created_at=now)).inserted_primary_key[0]
        index = self.index()  # adds the new row; a replaced study's count mismatch rebuilds
        index.save(self.path)
        return int(study_id)

    def delete_study(self, study_uid: str) -> int:
        """Remove a study's vectors (all models) from the table and from the index of each partition it was in;
        returns the rows deleted."""
        with self.engine.begin() as connection:
            found = connection.execute(select(slice_embeddings.c.id, slice_embeddings.c.index_partition).where(
                and_(slice_embeddings.c.study_instance_uid == study_uid,
                     slice_embeddings.c.model == self.model))).all()
            deleted = connection.execute(delete(slice_embeddings).where(
                slice_embeddings.c.study_instance_uid == study_uid)).rowcount
        by_partition: dict[str, list[int]] = defaultdict(list)
        for row in found:
            by_partition[row.index_partition].append(row.id)
        for partition, ids in by_partition.items():
            book = self if partition == self.partition else SliceIndexBook(self.settings, self.engine, self.model,
                                                                           self.dim, partition)
            index = book.index() if book._index is None else book._index
            index.remove(ids)
            index.save(book.path)
        return int(deleted or 0)


def partitions(settings: Settings, engine, model: str | None = None) -> list[str]:
    """The partitions that hold vectors of the current (or the given) model."""
    with engine.connect() as connection:
        return sorted(connection.execute(
            select(slice_embeddings.c.index_partition).distinct()
            .where(slice_embeddings.c.model == (model or model_key(settings)))).scalars())


def rebuild_all(settings: Settings, engine) -> dict[str, int]:
    """Every partition's index made anew from the table: partition -> studies in it. The unnamed partition (rows
    from before partitioning; the file ``index_path`` itself) is always written, empty or not."""
    return {partition: SliceIndexBook(settings, engine, partition=partition).rebuild()
            for partition in sorted({"", *partitions(settings, engine)})}


def study_partition(headers_by_series) -> str:
    """The index partition of a study: modality and body region of its series with the most images."""
    from models.vector_index import partition_key
    from pacs_bridge.codes import body_region

    ranked = sorted((h for h in headers_by_series.values() if h), key=len, reverse=True)
    if not ranked:
        return partition_key("", "")
    first = ranked[0][0]
    return partition_key(str(first.get("Modality") or ""), body_region(str(first.get("BodyPartExamined") or "")))


# -- pseudonymous references to similar studies ---------------------------------------------------------------------
def study_reference_key(settings: Settings) -> bytes:
    """The site key of pseudonymous study references: ``slice_evidence.reference_key_file``, or a random key
    made once under ``<var_dir>/keys`` (readable by this user only). Workers on several hosts must share it."""
    import os

    configured = settings.slice_evidence.reference_key_file
    path = Path(configured) if configured else settings.var_dir / "keys" / "study-reference.key"
    if not path.exists() and not configured:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another worker made it first
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(32).hex().encode())
                handle.flush()
                os.fsync(handle.fileno())
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"slice_evidence.reference_key_file {path} cannot be read: {exc}") from None
    if len(key) < 16:
        raise ValueError(f"the study reference key in {path} is shorter than 16 bytes")
    return key


def study_reference(settings: Settings, study_uid: str) -> str:
    from pacs_bridge.study_reference import study_reference as reference

    return reference(study_reference_key(settings), study_uid)


def resolve_study_references(settings: Settings, engine, references) -> dict[str, str]:
    """reference -> Study Instance UID for the references of studies this site holds or indexed (for authorised
    users; unresolved references stay pseudonyms). Each candidate UID is hashed once per call: fine up to about a
    million studies a second; beyond that, store each study's reference beside it."""
    from pacs_bridge.study_reference import PREFIX, resolve

    references = [r for r in references if r and r.startswith(PREFIX)]
    if not references:
        return {}
    with engine.connect() as connection:
        candidates = set(connection.execute(select(slice_embeddings.c.study_instance_uid).distinct()).scalars())
        candidates.update(connection.execute(select(studies.c.study_instance_uid)).scalars())
    return resolve(study_reference_key(settings), references, candidates)


def confirmed_findings(engine, study_uids: list[str]) -> dict[str, frozenset[str] | None]:
    """Per study, the labels present in its latest final (or corrected) report; None without such a report."""
    from pacs_bridge.report_schema import ground_truth_labels, reports

    out: dict[str, frozenset[str] | None] = {uid: None for uid in study_uids}
    if not study_uids:
        return out
    with engine.connect() as connection:
        finals = connection.execute(
            select(reports.c.id, reports.c.study_instance_uid, reports.c.reported_at)
            .where(and_(reports.c.study_instance_uid.in_(study_uids), reports.c.status.in_(FINAL_REPORT_STATUSES)))
            .order_by(reports.c.reported_at, reports.c.id)).all()
        latest = {r.study_instance_uid: r.id for r in finals}  # ordered: the last one wins
        labels: dict[int, set[str]] = defaultdict(set)
        if latest:
            for row in connection.execute(select(ground_truth_labels.c.report_id, ground_truth_labels.c.label)
                                          .where(and_(ground_truth_labels.c.report_id.in_(list(latest.values())),
                                                      ground_truth_labels.c.value == 1))):
                labels[row.report_id].add(row.label)
    for uid, report_id in latest.items():
        out[uid] = frozenset(labels.get(report_id, set()))
    return out


# -- computing evidence ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StudyEvidence:
    similar: tuple[SimilarStudy, ...]
    neighbours: list  # models.knn.Neighbour, the k nearest, most similar first
    n_series: int
    n_slices: int
    study_vector: np.ndarray | None = None  # the study's MedImageInsight vector (zero-shot findings score it)


class SliceEvidence:
    """The embedder and the index book of one worker process."""

    def __init__(self, settings: Settings, engine) -> None:
        from models.slice_embedder import SliceEmbedder, load_slice_model, resolve_device

        cfg = settings.slice_evidence
        self.settings, self.engine, self.cfg = settings, engine, cfg
        device = resolve_device(cfg.device)
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
        model = load_slice_model(cfg.weights or None, cfg.config, device=device, precision=precision)
        self.embedder = SliceEmbedder(model, device=device, batch_size=int(cfg.batch_size))
        self._books: dict[str, SliceIndexBook] = {}
        self.model_version = model_key(settings).split(":", 1)[1]
        self.reference_key = study_reference_key(settings)

    def book(self, partition: str) -> SliceIndexBook:
        """The index of one partition, kept for the process's life."""
        if partition not in self._books:
            self._books[partition] = SliceIndexBook(self.settings, self.engine, dim=self.embedder.dim,
                                                    partition=partition)
        return self._books[partition]

    def embed_study(self, image_paths: dict[str, list[Path]]) -> tuple[np.ndarray | None,
                                                                        dict[str, tuple[np.ndarray, int]],
                                                                        dict[str, str]]:
        from models.slice_embedder import median_embedding

        chosen = sorted(image_paths, key=lambda uid: (-len(image_paths[uid]), uid))[: int(self.cfg.max_series)]
        per_series: dict[str, tuple[np.ndarray, int]] = {}
        problems: dict[str, str] = {}
        for uid in chosen:
            vector, slices, trouble = self.embedder.embed_series(sorted(image_paths[uid]),
                                                                 int(self.cfg.max_slices_per_series))
            problems.update(trouble)
            if vector is not None:
                per_series[uid] = (vector, len(slices))
        if not per_series:
            return None, {}, problems
        return median_embedding(np.stack([v for v, _ in per_series.values()])), per_series, problems

    def process_study(self, study_uid: str, run_id: int | None, image_paths: dict[str, list[Path]],
                      timings: dict[str, float] | None = None, partition: str = "") -> StudyEvidence:
        """Embed, search (within the study's partition, before adding, so the study never finds itself), store;
        the evidence found, each similar study with its pseudonymous reference."""
        from models.knn import Neighbour
        from pacs_bridge.study_reference import study_reference as reference

        timings = timings if timings is not None else {}
        t0 = time.perf_counter()
        study_vector, per_series, problems = self.embed_study(image_paths)
        timings["slice_embed_s"] = time.perf_counter() - t0
        for where, why in list(problems.items())[:20]:
            log.warning("study %s: slice evidence skipped %s: %s", study_uid, Path(where).name, why)
        if study_vector is None:
            raise ValueError(f"study {study_uid}: no slice could be embedded ({len(problems)} files failed)")
        t0 = time.perf_counter()
        k = max(int(self.cfg.k), int(self.cfg.evidence_k))
        book = self.book(partition)
        found = book.neighbours(study_vector, k, exclude_study=study_uid)
        truth = confirmed_findings(self.engine, [uid for uid, _ in found])
        neighbours = [Neighbour(uid, s, truth[uid]) for uid, s in found]
        minimum = float(self.cfg.min_similarity)
        similar = tuple(SimilarStudy(n.key, float(n.similarity), tuple(sorted(n.labels or ())),
                                     reference=reference(self.reference_key, n.key))
                        for n in neighbours[: int(self.cfg.evidence_k)] if n.similarity >= minimum)
        book.add_study(study_uid, run_id, study_vector, per_series)
        timings["slice_search_s"] = time.perf_counter() - t0
        return StudyEvidence(similar, neighbours[: int(self.cfg.k)], len(per_series),
                             sum(n for _, n in per_series.values()), study_vector)


_EVIDENCE: "weakref.WeakKeyDictionary[object, SliceEvidence | None]" = weakref.WeakKeyDictionary()


def evidence_for(processor) -> SliceEvidence | None:
    """The processor's SliceEvidence, built once; None when switched off or not configured (said once)."""
    if processor in _EVIDENCE:
        return _EVIDENCE[processor]
    cfg = processor.settings.slice_evidence
    evidence = None
    if not cfg.enabled:
        log.info("slice evidence is switched off (slice_evidence.enabled)")
    elif not cfg.weights and cfg.config != "tiny":
        log.warning("slice evidence: slice_evidence.weights is not set (the MedImageInsight weights file); "
                    "results go out without similar prior studies")
    else:
        evidence = SliceEvidence(processor.settings, processor.engine)
    _EVIDENCE[processor] = evidence
    return evidence


def add_slice_evidence(processor, item, result: TriageResult) -> TriageResult:
    """``result`` with the similar prior studies of the prepared run ``item`` (neuro_mri); never raises."""
    try:
        evidence = evidence_for(processor)
        if evidence is None:
            return result
        found = evidence.process_study(item.claim.study_uid, item.claim.run_id, item.image_paths, item.timings,
                                       partition=getattr(item, "partition", ""))
    except Exception as exc:  # evidence is an addition: the triage result goes out without it
        log.error("study %s: no slice evidence: %s: %s", item.claim.study_uid, type(exc).__name__, exc,
                  exc_info=True)
        return result
    return dataclasses.replace(result, similar_studies=found.similar)


# -- the slice_knn pipeline ------------------------------------------------------------------------------------------
def slice_knn_processor_for(processor, run_id: int) -> "SliceKnnProcessor | None":
    """A processor for ``run_id`` when its pipeline is slice_knn, else None (the run is Prima's)."""
    with processor.engine.connect() as connection:
        pipeline = connection.execute(select(processing_runs.c.pipeline)
                                      .where(processing_runs.c.id == run_id)).scalar_one_or_none()
    return SliceKnnProcessor(processor) if pipeline == PIPELINE else None


def knn_result(study_uid: str, neighbours: list, settings: Settings, model_version: str) -> tuple[TriageResult,
                                                                                                   dict[str, float]]:
    """The kNN findings (scores of the labels the voting neighbours carry that the SR code table knows) as a
    result, and every label's score."""
    from models.knn import label_scores
    from pacs_bridge.codes import DIAGNOSIS_CODES

    cfg = settings.slice_evidence
    scores = label_scores(neighbours, k=int(cfg.k))
    threshold = float(cfg.finding_threshold)
    # Only labels the SR can code become findings; the others are still scored (predictions table).
    ranked = sorted((label for label in scores if label in DIAGNOSIS_CODES), key=lambda label: (-scores[label], label))
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
                      if label in DIAGNOSIS_CODES and label not in reported and scores.get(label, 0.0) < threshold)
    levels = [cfg.priority_of_findings.get(f.label, "routine") for f in findings if f.positive]
    for level in levels:
        if level not in PRIORITIES:
            raise ValueError(f"slice_evidence.priority_of_findings: {level!r} is not one of {PRIORITIES}")
    priority = max(levels, key=PRIORITIES.index, default="routine")
    return TriageResult(study_instance_uid=study_uid, priority=priority, findings=findings,
                        model_name="medimageinsight-knn", model_version=model_version), scores


class SliceKnnProcessor:
    """One slice_knn run: slices -> embeddings -> neighbours -> kNN findings and evidence -> SR and deliveries.

    It uses the RunProcessor's claiming, failure, SR and delivery steps, so a slice_knn run is idempotent, timed
    and delivered exactly as a neuro_mri run is.
    """

    def __init__(self, processor) -> None:
        self.processor = processor

    def process(self, run_id: int, worker_host: str):
        from worker.pipeline import Claimed, RunOutcome

        p = self.processor
        claimed = p._claim(run_id, worker_host)
        if claimed is None:
            return RunOutcome(run_id, "duplicate")
        claim = Claimed(run_id, *claimed)
        try:
            return self._run(claim)
        except Exception as exc:  # recorded on the run, as RunProcessor does
            return p._fail(claim, exc)

    def _image_paths(self, study_id: int) -> dict[str, list[Path]]:
        with self.processor.engine.connect() as connection:
            rows = connection.execute(
                select(series.c.series_instance_uid, series.c.modality, instances.c.sop_class_uid,
                       instances.c.path)
                .select_from(series.join(instances, instances.c.series_id == series.c.id))
                .where(series.c.study_id == study_id)).all()
        paths: dict[str, list[Path]] = defaultdict(list)
        for r in rows:
            if not is_derived_object(r.modality or "", r.sop_class_uid):
                paths[r.series_instance_uid].append(Path(r.path))
        return dict(paths)

    def _run(self, claim):
        from worker.metrics import RUNS, STAGE_SECONDS
        from worker.pipeline import RunFailed, RunOutcome
        from worker.zero_shot import add_slice_zero_shot
        p = self.processor
        timings: dict[str, float] = {}
        image_paths = self._image_paths(claim.study_id)
        if not image_paths:
            raise RunFailed("the study has no image instances")
        evidence = evidence_for(p)
        if evidence is None:
            raise RunFailed("slice_knn needs slice_evidence enabled with its weights (slice_evidence.weights)")
        from worker.input_gate import read_headers

        headers = read_headers(image_paths)
        verdict = p.judge_input(claim, PIPELINE, headers)
        if verdict is not None and not verdict.adequate:
            return p.not_analysed(claim, PIPELINE, verdict, image_paths, "medimageinsight-knn",
                                  evidence.model_version)
        p._stamp(claim.run_id, "loaded_at", model_name="medimageinsight-knn", model_version=evidence.model_version)
        try:
            found = evidence.process_study(claim.study_uid, claim.run_id, image_paths, timings,
                                           partition=study_partition(headers))
        except ValueError as exc:
            raise RunFailed(str(exc)) from exc
        p._stamp(claim.run_id, "inferred_at")
        result, scores = knn_result(claim.study_uid, found.neighbours, p.settings, evidence.model_version)
        result = dataclasses.replace(result, similar_studies=found.similar)
        # zero-shot findings beside the kNN (zero_shot.enabled)
        result = add_slice_zero_shot(evidence, result, found.study_vector, found.neighbours, scores)
        t0 = time.perf_counter()
        sr_path, sr = p._write_sr(claim.run_id, claim.study_id, claim.study_uid, claim.version, result,
                                  [path for paths in image_paths.values() for path in paths])
        timings["sr_s"] = time.perf_counter() - t0
        p._stamp(claim.run_id, "sr_created_at", sr_sop_instance_uid=str(sr.SOPInstanceUID), sr_path=str(sr_path),
                 priority=result.priority)
        reported = {f.label for f in result.findings}
        threshold = float(p.settings.slice_evidence.finding_threshold)
        with p.engine.begin() as connection:
            connection.execute(predictions.delete().where(predictions.c.run_id == claim.run_id))
            if scores:
                connection.execute(insert(predictions), [
                    {"run_id": claim.run_id, "kind": "diagnosis", "label": label, "probability": float(score),
                     "threshold": threshold, "reported": int(label in reported)} for label, score in scores.items()])
            if not found.neighbours or all(n.labels is None for n in found.neighbours):
                connection.execute(insert(events).values(
                    at=utcnow(), kind="slice_knn", study_instance_uid=claim.study_uid,
                    reason=f"run {claim.run_id}: no neighbour with a final report; evidence only"))
        p.publish(claim.run_id, result)
        delivery_ids = p.deliveries.create(claim.run_id, str(sr.SOPInstanceUID), sr_path)
        forward_ids = p.deliveries.create_forwards_after(claim.run_id, result, scores)
        for delivery_id in delivery_ids + forward_ids:
            p.enqueue_delivery(delivery_id)
        finished = utcnow()
        timings["slice_series"], timings["slice_count"] = found.n_series, found.n_slices
        with p.engine.begin() as connection:
            connection.execute(update(processing_runs).where(processing_runs.c.id == claim.run_id).values(
                status="done", finished_at=finished, timings=timings,
                delivered_at=None if delivery_ids else finished))
            connection.execute(update(studies).where(and_(studies.c.id == claim.study_id,
                                                          studies.c.version == claim.version))
                               .values(status="done"))
        RUNS.labels(pipeline=PIPELINE, outcome="done").inc()
        for stage, seconds in timings.items():
            if stage.endswith("_s"):
                STAGE_SECONDS.labels(stage=stage[:-2]).observe(seconds)
        log.info("run %d study %s v%d (slice_knn): priority %s, %d findings, %d similar studies", claim.run_id,
                 claim.study_uid, claim.version, result.priority, len(result.findings), len(result.similar_studies))
        return RunOutcome(claim.run_id, "done", sr_path, result)


# -- `triage index ...` --------------------------------------------------------------------------------------------
def _book_from_args(args) -> SliceIndexBook:
    from pacs_bridge.schema import make_engine
    from worker.config import load_settings

    settings = load_settings(args.config)
    return SliceIndexBook(settings, make_engine(settings.database_url))


def _rebuild(args) -> int:
    book = _book_from_args(args)
    t0 = time.perf_counter()
    counts = rebuild_all(book.settings, book.engine)
    for partition, n in counts.items():
        print(f"index {SliceIndexBook(book.settings, book.engine, partition=partition).path}: {n} studies of "
              f"model {book.model}")
    print(f"{sum(counts.values())} studies in {len(counts)} partitions, {time.perf_counter() - t0:.1f}s")
    return 0


def _delete(args) -> int:
    book = _book_from_args(args)
    n = book.delete_study(args.study)
    print(f"study {args.study}: {n} vectors deleted" if n else f"study {args.study} is not in the index")
    return 0 if n else 1


def _stats(args) -> int:
    book = _book_from_args(args)
    total = 0
    for partition in partitions(book.settings, book.engine):
        index = SliceIndexBook(book.settings, book.engine, partition=partition).index()
        total += len(index)
        print(f"partition {partition or '(none)'}: {len(index)} studies ({index.kind}, {index.dim}-d)")
    print(f"index {index_path(book.settings)}: {total} studies of model {book.model}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("index", help="the slice-embedding index of prior studies (similar-study "
                                                 "evidence, slice_knn)")
    sub = parser.add_subparsers(dest="index_command", required=True)
    p = sub.add_parser("rebuild", help="make the faiss index anew from the slice_embeddings table (after a lost "
                                       "file, deletions, or growing past slice_evidence.exact_max)")
    p.set_defaults(func=_rebuild)
    p = sub.add_parser("delete", help="remove one study's vectors from the table and the index")
    p.add_argument("--study", required=True, help="StudyInstanceUID")
    p.set_defaults(func=_delete)
    p = sub.add_parser("stats", help="how many studies the index holds, of which model")
    p.set_defaults(func=_stats)

