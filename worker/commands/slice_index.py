"""``triage index rebuild|delete|stats``: maintain the slice-embedding index of prior studies (similar-study
evidence, slice_knn) from its table (:mod:`sql.slice_index`)."""
from __future__ import annotations

import time

from sqlalchemy.engine import Engine

from sql.slice_index import partitions
from worker.config import Settings
from worker.slice_evidence import index_book, index_path, model_key, rebuild_all


def _open(args) -> tuple[Settings, Engine]:
    from sql.database import make_engine
    from worker.config import load_settings

    settings = load_settings(args.config)
    return settings, make_engine(settings.database_url)


def _rebuild(args) -> int:
    settings, engine = _open(args)
    t0 = time.perf_counter()
    counts = rebuild_all(settings, engine)
    for partition, n in counts.items():
        path = index_book(settings, engine, partition).path
        print(f"index {path}: {n} studies of model {model_key(settings)}")
    print(f"{sum(counts.values())} studies in {len(counts)} partitions, {time.perf_counter() - t0:.1f}s")
    return 0


def _delete(args) -> int:
    settings, engine = _open(args)
    n = index_book(settings, engine).delete_study(args.study)
    print(f"study {args.study}: {n} vectors deleted" if n else f"study {args.study} is not in the index")
    return 0 if n else 1


def _stats(args) -> int:
    settings, engine = _open(args)
    total = 0
    for partition in partitions(engine, model_key(settings)):
        index = index_book(settings, engine, partition).index()
        total += len(index)
        print(f"partition {partition or '(none)'}: {len(index)} studies ({index.kind}, {index.dim}-d)")
    print(f"index {index_path(settings)}: {total} studies of model {model_key(settings)}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("index", help="the slice-embedding index of prior studies (similar-study "
                                                 "evidence, slice_knn)")
    sub = parser.add_subparsers(dest="index_command", required=True)
    p = sub.add_parser("rebuild", help="make the faiss index anew from the slice_embeddings table (after a "
                                       "lost file, deletions, or growing past slice_evidence.exact_max)")
    p.set_defaults(func=_rebuild)
    p = sub.add_parser("delete", help="remove one study's vectors from the table and the index")
    p.add_argument("--study", required=True, help="StudyInstanceUID")
    p.set_defaults(func=_delete)
    p = sub.add_parser("stats", help="how many studies the index holds, of which model")
    p.set_defaults(func=_stats)
