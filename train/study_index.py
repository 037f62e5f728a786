"""The study-embedding index: nearest stored studies of a study, under the serving model's encoder.

Rebuilt by the nightly job after a promotion (the embeddings it holds must come from the serving encoder). A
flat inner-product index over L2-normalised embeddings (cosine similarity), with the study UIDs beside it.
"""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy.engine import Engine

from train.embedding_store import load_embeddings


def rebuild_study_index(engine: Engine, backbone_id: str, folder: Path) -> tuple[Path, int]:
    """Write ``<folder>/studies-<backbone_id>.faiss`` and ``.json`` (the UIDs in index order); returns the
    index path and how many studies it holds."""
    with engine.connect() as connection:
        stored = load_embeddings(connection, backbone_id)
    uids = sorted(stored)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"studies-{backbone_id}.faiss"
    if not uids:
        return path, 0
    vectors = np.stack([stored[u] for u in uids]).astype(np.float32)
    faiss.normalize_L2(vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    temporary = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(temporary))
    temporary.replace(path)
    path.with_suffix(".json").write_text(json.dumps({"backbone_id": backbone_id, "study_uids": uids}))
    return path, len(uids)
