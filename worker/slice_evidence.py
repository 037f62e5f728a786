"""Slice evidence: similar prior studies from MedImageInsight slice embeddings, the step both pipelines use.

At processing time a study's image series are embedded (an evenly spaced subset of slices per series; series
and study embeddings by median), the study-level index of its partition is searched for the ``evidence_k``
most similar *other* studies, and the study's vectors are stored (the slice index book,
:mod:`sql.slice_index`). The evidence, each prior study with its similarity and its confirmed findings (labels
of its latest final report), goes into ``TriageResult.similar_studies`` and so into the SR.

* ``neuro_mri`` (:mod:`worker.pipelines.neuro_mri`): :func:`add_slice_evidence` after building the Prima
  result; evidence that cannot be computed is logged and the result goes out without it.
* ``slice_knn`` (:mod:`worker.pipelines.slice_knn`): :meth:`SliceEvidence.process_study`, whose neighbours'
  findings are the run's kNN findings.

This module also reads the index's configuration (:func:`index_book`, :func:`rebuild_all`) for the pipelines,
the periodic index maintenance and ``triage index`` (:mod:`worker.commands.slice_index`).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections import defaultdict
from pathlib import Path

import numpy as np
from sqlalchemy import and_, select

from pacs_bridge.results import SimilarStudy, TriageResult
from sql.schema import studies
from sql.slice_index import IndexFiles, SliceIndexBook
from sql.slice_index import rebuild_all as rebuild_partitions
from sql.slice_index_schema import slice_embeddings
from worker.config import Settings

log = logging.getLogger(__name__)

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


# -- the index book, as configured -----------------------------------------------------------------------
def index_files(settings: Settings) -> IndexFiles:
    """Where the configured index files are and how they are made (``slice_evidence.*``)."""
    from models.vector_index import IndexError_, IndexSettings, VectorIndex, partition_path

    cfg = settings.slice_evidence
    return IndexFiles(path=index_path(settings), index_type=VectorIndex,
                      index_settings=IndexSettings(exact_max=int(cfg.exact_max),
                                                   approximate=cfg.approximate, nprobe=int(cfg.nprobe)),
                      unreadable=IndexError_, partition_path=partition_path)


def index_book(settings: Settings, engine, partition: str = "", dim: int | None = None) -> SliceIndexBook:
    """The index book of the configured model for one partition."""
    return SliceIndexBook(engine, model_key(settings), dim or _settings_dim(settings), index_files(settings),
                          partition)


def rebuild_all(settings: Settings, engine) -> dict[str, int]:
    """Every partition's index of the configured model made anew from the table: partition -> studies."""
    return rebuild_partitions(engine, model_key(settings), _settings_dim(settings), index_files(settings))


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
    from sql.report_schema import ground_truth_labels, reports

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
            self._books[partition] = index_book(self.settings, self.engine, partition, dim=self.embedder.dim)
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


_EVIDENCE: weakref.WeakKeyDictionary[object, SliceEvidence | None] = weakref.WeakKeyDictionary()


def evidence_for(owner) -> SliceEvidence | None:
    """The SliceEvidence of ``owner`` (a worker process's run book, or anything with its ``settings`` and
    ``engine``), built once; None when switched off or not configured (said once)."""
    if owner in _EVIDENCE:
        return _EVIDENCE[owner]
    cfg = owner.settings.slice_evidence
    evidence = None
    if not cfg.enabled:
        log.info("slice evidence is switched off (slice_evidence.enabled)")
    elif not cfg.weights and cfg.config != "tiny":
        log.warning("slice evidence: slice_evidence.weights is not set (the MedImageInsight weights file); "
                    "results go out without similar prior studies")
    else:
        evidence = SliceEvidence(owner.settings, owner.engine)
    _EVIDENCE[owner] = evidence
    return evidence


def add_slice_evidence(owner, item, result: TriageResult) -> TriageResult:
    """``result`` with the similar prior studies of the prepared run ``item`` (neuro_mri), by the evidence of
    ``owner`` (see :func:`evidence_for`); never raises."""
    try:
        evidence = evidence_for(owner)
        if evidence is None:
            return result
        found = evidence.process_study(item.claim.study_uid, item.claim.run_id, item.image_paths, item.timings,
                                       partition=getattr(item, "partition", ""))
    except Exception as exc:  # evidence is an addition: the triage result goes out without it
        log.error("study %s: no slice evidence: %s: %s", item.claim.study_uid, type(exc).__name__, exc,
                  exc_info=True)
        return result
    return dataclasses.replace(result, similar_studies=found.similar)
