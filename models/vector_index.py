"""A persisted faiss index of L2-normalised embeddings, searched by inner product (= cosine similarity).

Kinds, chosen by size (``IndexSettings``): exact ``flat`` (IndexFlatIP) up to ``exact_max`` vectors; beyond it
``ivf`` (IndexIVFFlat, inner product, ``nprobe`` lists searched) or ``hnsw`` (IndexHNSWFlat). Ids are the caller's
64-bit ids (the database rows that map them to studies and series). Deleting removes ids where the index kind can
(flat, IVF) and otherwise keeps a tombstone set that searches filter out until the next rebuild.

Batched queries: faiss 1.15.1 sets ``distance_compute_blas_threshold`` to 128,000 queries, so an exact search of
a batch never uses a BLAS matrix product and runs 6-10x slower than it could (shared/reference/performance.md §4);
it is set to 20 (the older default) when this module is imported.

On disk: ``<path>`` (faiss' own format, written atomically) and ``<path>.json`` (kind, dimension, tombstones,
settings). GPU: when faiss has GPUs (faiss-gpu) the exact index is copied to GPU 0 for searching; with faiss-cpu
and a CUDA device an exact search runs as a torch matrix product (``device="cuda"``; ``"torch:cpu"`` runs that
path on the CPU).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _import_faiss():
    """faiss, imported without its loader's INFO narrative: it tries the AVX512 and AVX2 builds first and logs a
    ModuleNotFoundError for each one a wheel does not ship (the plain build then loads and dispatches on the CPU
    itself). What was loaded is said once, below."""
    loader = logging.getLogger("faiss.loader")
    level = loader.level
    loader.setLevel(logging.WARNING)
    try:
        import faiss
    finally:
        loader.setLevel(level)
    return faiss


def faiss_backend() -> str:
    """Which faiss this process uses: version, compile options (SIMD levels), GPUs."""
    options = faiss.get_compile_options().strip() if hasattr(faiss, "get_compile_options") else "unknown"
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return f"faiss {faiss.__version__} ({options}; {gpus} GPU{'s' if gpus != 1 else ''})"


faiss = _import_faiss()
log.info("vector index backend: %s", faiss_backend())

# Batched queries use GEMM from 20 queries on (see the module docstring).
faiss.cvar.distance_compute_blas_threshold = 20

KINDS = ("flat", "ivf", "hnsw")


class IndexError_(RuntimeError):
    """An index file that cannot be used (missing, another dimension, unreadable)."""


@dataclass(frozen=True)
class IndexSettings:
    #: Exact search up to this many vectors; beyond it the approximate kind below.
    exact_max: int = 200_000
    #: ivf | hnsw
    approximate: str = "ivf"
    #: IVF lists (0: about 2 x sqrt(n), at least 1 and at most n / 39 so each list trains on 39 points).
    nlist: int = 0
    nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    hnsw_ef_construction: int = 80


#: Partition of vectors whose study has no known modality or region.
UNKNOWN_PART = "UNKNOWN"


def partition_key(modality: str, region: str) -> str:
    """The partition of a study's vectors: its modality and body region, e.g. ``MR-HEAD``.

    Embeddings of different kinds of image are not comparable evidence (a brain MR must never find CT heads as
    similar), so each (modality, region) is an index of its own. Letters and digits only, so the key is safe in a
    file name; an empty part becomes ``UNKNOWN``.
    """
    parts = ["".join(ch for ch in text.upper() if ch.isascii() and ch.isalnum()) or UNKNOWN_PART
             for text in (modality, region)]
    return "-".join(parts)[:64]


def partition_path(path: str | Path, partition: str) -> Path:
    """The file of one partition's index beside ``path`` (``slices.faiss`` -> ``slices.MR-HEAD.faiss``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{partition}{path.suffix}") if partition else path


def choose_kind(n: int, settings: IndexSettings) -> str:
    if n <= settings.exact_max:
        return "flat"
    if settings.approximate not in ("ivf", "hnsw"):
        raise ValueError(f"index.approximate must be ivf or hnsw, not {settings.approximate!r}")
    return settings.approximate


def _as_matrix(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{what} of shape {vectors.shape}; the index holds {dim}-d vectors")
    return vectors


@dataclass
class VectorIndex:
    dim: int
    kind: str = "flat"
    settings: IndexSettings = field(default_factory=IndexSettings)
    device: str = "cpu"
    tombstones: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._index = None
        self._gpu_index = None
        self._torch = None  # (vectors on the device, ids) for torch exact search

    # -- building ------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, dim: int, vectors: np.ndarray, ids: np.ndarray, settings: IndexSettings | None = None,
              device: str = "cpu", kind: str | None = None) -> "VectorIndex":
        """An index of the kind the count calls for (or ``kind``), holding ``vectors`` under ``ids``."""
        settings = settings or IndexSettings()
        vectors = _as_matrix(vectors, dim, "vectors")
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if len(ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        kind = kind or choose_kind(len(vectors), settings)
        if kind not in KINDS:
            raise ValueError(f"index kind {kind!r} is not one of {KINDS}")
        index = cls(dim, kind, settings, device)
        index._index = index._empty(len(vectors), vectors)
        if len(vectors):
            index._index.add_with_ids(vectors, ids)
        index._device_copy()
        return index

    def _empty(self, n: int, training: np.ndarray):
        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, self.settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.settings.hnsw_ef_construction
            hnsw.hnsw.efSearch = self.settings.hnsw_ef_search
            return faiss.IndexIDMap2(hnsw)
        nlist = self.settings.nlist or int(2 * math.sqrt(max(n, 1)))
        nlist = max(1, min(nlist, max(n // 39, 1)))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if len(training) < nlist:
            raise ValueError(f"an IVF index with {nlist} lists needs at least {nlist} training vectors")
        # k-means on 64 points per list, 10 iterations: enough for the list centres (faiss warns below 39 per
        # list) and minutes, not hours, on a CPU for a million 1024-d vectors.
        sample = training
        if len(training) > nlist * 64:
            rng = np.random.default_rng(0)
            sample = training[np.sort(rng.choice(len(training), nlist * 64, replace=False))]
        ivf.cp.niter = 10
        ivf.train(np.ascontiguousarray(sample))
        ivf.nprobe = min(self.settings.nprobe, nlist)
        # reconstruct() by id (for rebuilds and device copies) and remove_ids with arbitrary ids
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._quantizer = quantizer  # keep the Python wrapper alive with the index
        return ivf

    def _device_copy(self) -> None:
        self._gpu_index = None
        self._torch = None
        if self.device == "cpu" or self.kind != "flat":
            return
        if self.device.startswith("torch:"):  # an explicit torch exact search (e.g. "torch:cpu")
            self._torch_copy(self.device[len("torch:"):])
            return
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._gpu_resources = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
            return
        self._torch_copy(self.device)

    def _torch_copy(self, device: str) -> None:
        import torch

        vectors, ids = self.vectors_and_ids()
        # fp16 on a GPU halves the memory traffic that bounds the search; exact order can differ only between
        # near-ties (|difference| < 1e-3)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self._torch = (torch.from_numpy(vectors).to(device, dtype), ids)

    # -- contents ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal) - len(self.tombstones)

    def vectors_and_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live vector and its id (for a rebuild or a device copy)."""
        if self._index is None or self._index.ntotal == 0:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        if self.kind == "ivf":
            invlists = self._index.invlists
            ids = np.concatenate([faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                                  for i in range(self._index.nlist)]) if self._index.nlist else np.zeros(0)
            ids = np.sort(ids.astype(np.int64))
            vectors = np.stack([self._index.reconstruct(int(i)) for i in ids]) if len(ids) else \
                np.zeros((0, self.dim), np.float32)
        else:
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            vectors = self._index.index.reconstruct_n(0, self._index.ntotal)
        keep = ~np.isin(ids, np.fromiter(self.tombstones, np.int64, len(self.tombstones)))
        return vectors[keep], ids[keep]

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vectors = _as_matrix(vectors, self.dim, "vectors")
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if self._index is None:
            self._index = self._empty(len(vectors), vectors)
        self.tombstones.difference_update(int(i) for i in ids)
        self._index.add_with_ids(vectors, ids)
        self._device_copy()

    def remove(self, ids) -> None:
        ids = np.asarray(list(ids), dtype=np.int64)
        if self._index is None or not len(ids):
            return
        if self.kind == "hnsw":
            self.tombstones.update(int(i) for i in ids)
        else:
            self._index.remove_ids(ids)
        self._device_copy()

    # -- searching -----------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (n_queries, k), most similar first; id -1 where fewer than k exist."""
        queries = _as_matrix(queries, self.dim, "queries")
        n = len(queries)
        if self._index is None or len(self) == 0 or k <= 0:
            return np.full((n, max(k, 0)), -np.inf, np.float32), np.full((n, max(k, 0)), -1, np.int64)
        if self._torch is not None:
            return self._torch_search(queries, k)
        extra = min(len(self.tombstones), self._index.ntotal)
        index = self._gpu_index or self._index
        sims, ids = index.search(queries, k + extra)
        if extra:
            dead = np.isin(ids, np.fromiter(self.tombstones, np.int64, len(self.tombstones)))
            sims, ids = sims.copy(), ids.copy()
            sims[dead], ids[dead] = -np.inf, -1
            order = np.argsort(-sims, axis=1, kind="stable")
            sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
        sims, ids = sims[:, :k], ids[:, :k]
        sims = np.where(ids < 0, -np.inf, sims).astype(np.float32)
        return sims, ids

    def _torch_search(self, queries: np.ndarray, k: int):
        import torch

        vectors, ids = self._torch
        q = torch.from_numpy(queries).to(vectors.device, vectors.dtype)
        k_eff = min(k, vectors.shape[0])
        sims, where = torch.topk(q @ vectors.T, k_eff, dim=1)
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        out_s[:, :k_eff] = sims.float().cpu().numpy()
        out_i[:, :k_eff] = ids[where.cpu().numpy()]
        return out_s, out_i

    # -- disk ----------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self._index if self._index is not None else self._empty(0, np.zeros((0, self.dim))),
                          str(tmp))
        meta = {"dim": self.dim, "kind": self.kind, "settings": asdict(self.settings),
                "tombstones": sorted(self.tombstones), "count": len(self)}
        tmp_meta = path.with_name(path.name + ".json.tmp")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp, path)
        os.replace(tmp_meta, path.with_name(path.name + ".json"))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dim: int | None = None) -> "VectorIndex":
        path = Path(path)
        meta_path = path.with_name(path.name + ".json")
        if not path.is_file() or not meta_path.is_file():
            raise IndexError_(f"{path}: no index there (run `triage index rebuild`)")
        meta = json.loads(meta_path.read_text())
        if dim is not None and int(meta["dim"]) != dim:
            raise IndexError_(f"{path}: holds {meta['dim']}-d vectors, the model makes {dim}-d ones "
                              f"(run `triage index rebuild` after changing models)")
        index = cls(int(meta["dim"]), meta["kind"], IndexSettings(**meta["settings"]), device,
                    set(int(i) for i in meta["tombstones"]))
        try:
            index._index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexError_(f"{path}: unreadable faiss index: {exc}") from exc
        if index.kind == "ivf":
            faiss.extract_index_ivf(index._index).nprobe = min(index.settings.nprobe, index._index.nlist)
        if index.kind == "hnsw":
            faiss.downcast_index(index._index.index).hnsw.efSearch = index.settings.hnsw_ef_search
        index._device_copy()
        return index


def brute_force_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k in numpy, ties broken by position: the reference the tests hold indexes to."""
    sims = np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T
    k_eff = min(k, sims.shape[1])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k_eff]
    return np.take_along_axis(sims, order, 1), np.asarray(ids)[order]
