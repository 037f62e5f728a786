"""The slice index book: which studies' slice vectors are indexed (the ``slice_embeddings`` table), per model
and partition, and the vector index file of each partition kept in step with the table.

The index file is a cache of the table: a book syncs it from the table before each search (new rows are added;
a count that no longer matches, after a deletion elsewhere, rebuilds it), so several workers can add studies
without losing each other's, and a lost file is made anew from the rows without re-reading any image.
Study-level rows (``series_instance_uid`` NULL) are the ones searched; series-level rows are stored beside
them.

This package imports none of ours: what the book needs from the model code (the vector index type, the file of
a partition) comes in as an :class:`IndexFiles`.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import and_, delete, func, insert, select
from sqlalchemy.engine import Engine

from sql.slice_index_schema import slice_embeddings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexFiles:
    """Where a model's index files are and how they are made (``models.vector_index`` provides the parts)."""

    #: The file of the unnamed partition (rows from before partitioning); the others lie beside it.
    path: Path
    #: ``VectorIndex``: ``build(dim, vectors, ids, settings)``, ``load(path, dim=)``; instances ``add``,
    #: ``remove``, ``search``, ``save``, ``vectors_and_ids`` and ``len``.
    index_type: Any
    #: What the index is made with (exact up to a size, then approximate).
    index_settings: Any
    #: What ``index_type.load`` raises for a missing or unreadable file.
    unreadable: type[Exception]
    #: The file of one partition's index, from ``path`` and the partition name.
    partition_path: Callable[[Path, str], Path]


class SliceIndexBook:
    """The study-level vector index of one model and one partition (modality and body region, e.g.
    ``MR-HEAD``), kept in step with the ``slice_embeddings`` table. Studies are searched only within their own
    partition."""

    def __init__(self, engine: Engine, model: str, dim: int, files: IndexFiles, partition: str = "") -> None:
        self.engine, self.model, self.dim, self.files = engine, model, dim, files
        self.partition = partition
        self.path = files.partition_path(files.path, partition)
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
        vectors, ids = self._vectors(self._study_rows())
        self._index = self.files.index_type.build(self.dim, vectors, ids, self.files.index_settings)
        self._last_id = int(ids.max()) if len(ids) else 0
        self._index.save(self.path)
        return len(ids)

    def index(self):
        """The index, loaded (or rebuilt) once and synced with the table on every call."""
        if self._index is None:
            try:
                self._index = self.files.index_type.load(self.path, dim=self.dim)
                _, ids = self._index.vectors_and_ids()
                self._last_id = int(ids.max()) if len(ids) else 0
            except self.files.unreadable as exc:
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

    def neighbours(self, vector: np.ndarray, k: int,
                   exclude_study: str | None = None) -> list[tuple[str, float]]:
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
        now = datetime.now(timezone.utc)
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
        """Remove a study's vectors (all models) from the table and from the index of each partition it was
        in; returns the rows deleted."""
        with self.engine.begin() as connection:
            found = connection.execute(
                select(slice_embeddings.c.id, slice_embeddings.c.index_partition)
                .where(and_(slice_embeddings.c.study_instance_uid == study_uid,
                            slice_embeddings.c.model == self.model))).all()
            deleted = connection.execute(delete(slice_embeddings).where(
                slice_embeddings.c.study_instance_uid == study_uid)).rowcount
        by_partition: dict[str, list[int]] = defaultdict(list)
        for row in found:
            by_partition[row.index_partition].append(row.id)
        for partition, ids in by_partition.items():
            book = self if partition == self.partition else SliceIndexBook(self.engine, self.model, self.dim,
                                                                           self.files, partition)
            index = book.index() if book._index is None else book._index
            index.remove(ids)
            index.save(book.path)
        return int(deleted or 0)


def partitions(engine: Engine, model: str) -> list[str]:
    """The partitions that hold vectors of ``model``."""
    with engine.connect() as connection:
        return sorted(connection.execute(
            select(slice_embeddings.c.index_partition).distinct()
            .where(slice_embeddings.c.model == model)).scalars())


def rebuild_all(engine: Engine, model: str, dim: int, files: IndexFiles) -> dict[str, int]:
    """Every partition's index of ``model`` made anew from the table: partition -> studies in it. The unnamed
    partition (rows from before partitioning; the file ``files.path`` itself) is always written, empty or not.
    """
    return {partition: SliceIndexBook(engine, model, dim, files, partition).rebuild()
            for partition in sorted({"", *partitions(engine, model)})}
