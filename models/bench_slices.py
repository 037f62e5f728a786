"""``triage bench embedder`` and ``triage bench knn``: slice-embedding throughput and nearest-neighbour search.

embedder: the MedImageInsight image tower (``full`` by default: 625.4 GFLOP per 480 x 480 slice, counted with
torch's FlopCounter on the meta device) on random weights. On a GPU: bf16 weights, channels-last, a batch of
slices (optionally ``--compile``). On a CPU: fp32, a small batch (a 480 x 480 slice takes seconds). ``peak_fraction``
divides the achieved FLOP rate by a dense GEMM measured on the same device in the same precision. Preprocessing
(DICOM decode, PIL resize) is not included: it runs on CPU workers beside the GPU.

knn: synthetic clustered unit vectors (embeddings of similar images cluster; uniform random vectors would make
every approximate index look broken), ``--n`` of them in ``--dim`` dimensions, queries drawn from the same
distribution; ``ms_per_query`` is the median time of one query at a time (the worker's case), with the batched
rate beside it; ``recall_at_10`` against exact numpy search. The last line printed is the JSON result.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from models.bench_encoder import _timed, counted_flops, gemm_peak_tflops


def bench_embedder(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triage bench embedder")
    parser.add_argument("--config", default="full", choices=("full", "tiny"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--batch", type=int, default=0, help="slices per batch (default: 64 on a GPU, 1 on a CPU)")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the tower first (GPU)")
    parser.add_argument("--prompts", default="slice_findings", help="zero-shot prompt table (file or name)")
    parser.add_argument("--studies", type=int, default=20,
                        help="studies scored zero-shot through the text embedding cache (hit rate)")
    args = parser.parse_args(argv or [])

    from models.medimageinsight import CONFIGS, MedImageInsight
    from models.slice_embedder import PRECISIONS, resolve_device

    device = torch.device(resolve_device(args.device))
    gpu = device.type == "cuda"
    precision = args.precision if args.precision != "auto" else ("bf16" if gpu else "fp32")
    dtype = PRECISIONS[precision]
    batch = args.batch or (64 if gpu else 1)
    repeats = args.repeats or (10 if gpu else 2)
    config = CONFIGS[args.config]

    with torch.device("meta"):
        meta_tower = MedImageInsight(config, device="meta").eval()
        flops_per_slice = counted_flops(lambda: meta_tower.encode_image(
            torch.empty(1, 3, args.size, args.size)))
    del meta_tower

    torch.manual_seed(0)
    model = MedImageInsight(config).eval().to(device=device, dtype=dtype)
    if gpu:
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    encode = torch.compile(model.encode_image) if args.compile else model.encode_image
    x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)
    if gpu:
        x = x.contiguous(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)

    def run():
        with torch.inference_mode():
            return encode(x)

    seconds = _timed(run, device, repeats)
    slices_per_s = batch / seconds
    achieved = flops_per_slice * slices_per_s / 1e12
    peak = gemm_peak_tflops(device, dtype)
    result = {
        "benchmark": "embedder", "config": args.config, "image_size": args.size, "batch": batch,
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "precision": precision, "compiled": bool(args.compile),
        "slices_per_s": round(slices_per_s, 3), "seconds_per_batch": round(seconds, 4),
        "gflop_per_slice": round(flops_per_slice / 1e9, 1), "achieved_tflops": round(achieved, 4),
        "gemm_peak_tflops": round(peak, 3), "peak_fraction": round(achieved / peak, 4),
    }
    result.update(_text_cache_figures(model, device, args.prompts, args.studies, batch))
    if gpu:
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result), flush=True)
    return 0


def _text_cache_figures(model, device, prompts: str, studies: int, batch: int) -> dict:
    """Zero-shot scoring of ``studies`` studies through a fresh text embedding cache: the text tower runs once
    (the miss), every later study reads the cache. Reports the hit rate and the one-off text cost."""
    import tempfile

    from models.clip_tokenizer import ClipTokenizer
    from models.zero_shot import PromptTable, TextEmbeddingCache

    table = PromptTable.load(prompts)
    tokenizer = ClipTokenizer()

    def embed_texts(texts):
        ids, mask = tokenizer(list(texts))
        with torch.inference_mode():
            return model.encode_text(ids.to(device), mask.to(device)).float().cpu().numpy()

    image = torch.nn.functional.normalize(torch.randn(model.config.projection_dim), dim=0).numpy()
    with tempfile.TemporaryDirectory() as folder:
        cache = TextEmbeddingCache(folder)
        first = time.perf_counter()
        cache.get("bench-random-weights", table, embed_texts).scores(image, model.scale)
        text_s = time.perf_counter() - first
        start = time.perf_counter()
        for _ in range(max(studies - 1, 0)):
            cache.get("bench-random-weights", table, embed_texts).scores(image, model.scale)
        cached_s = (time.perf_counter() - start) / max(studies - 1, 1)
    return {"zero_shot_prompts": len(table.texts()), "zero_shot_studies": studies,
            "text_cache_hit_rate": round(cache.hit_rate, 4), "text_cache_misses": cache.misses,
            "text_embed_s": round(text_s, 3), "zero_shot_cached_ms_per_study": round(1000 * cached_s, 3)}


def clustered_vectors(n: int, dim: int, clusters: int, noise_seed: int, centre_seed: int = 0,
                      spread: float = 0.8, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors around ``clusters`` random centres (float32, generated in chunks to bound memory). The
    centres depend on ``centre_seed`` only, so queries drawn with another ``noise_seed`` resemble the stored
    vectors without repeating them."""
    centres = np.random.default_rng(centre_seed).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(noise_seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)]
        x += (spread / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x
    return out


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> np.ndarray:
    """Row positions of the exact top-k by inner product, computed chunk by chunk."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(vectors), chunk):
        sims = queries @ vectors[start:start + chunk].T
        part = np.argpartition(-sims, min(k, sims.shape[1] - 1), axis=1)[:, :k]
        s = np.take_along_axis(sims, part, 1)
        merged_s = np.concatenate([best_s, s], 1)
        merged_i = np.concatenate([best_i, part + start], 1)
        order = np.argsort(-merged_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(merged_s, order, 1), np.take_along_axis(merged_i, order, 1)
    return best_i


def bench_knn(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triage bench knn")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--index", default="ivf", choices=("flat", "ivf", "hnsw"))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--nlist", type=int, default=0)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (faiss-gpu, else torch exact search)")
    args = parser.parse_args(argv or [])

    from models.vector_index import IndexSettings, VectorIndex

    t0 = time.perf_counter()
    vectors = clustered_vectors(args.n, args.dim, args.clusters, noise_seed=1)
    queries = clustered_vectors(args.queries, args.dim, args.clusters, noise_seed=2)
    generated_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    settings = IndexSettings(nlist=args.nlist, nprobe=args.nprobe)
    index = VectorIndex.build(args.dim, vectors, np.arange(args.n), settings, device=args.device, kind=args.index)
    build_s = time.perf_counter() - t0
    truth = exact_top_k(vectors, queries, args.k)

    single = []
    found = np.empty((len(queries), args.k), np.int64)
    for i in range(len(queries)):
        start = time.perf_counter()
        _, ids = index.search(queries[i:i + 1], args.k)
        single.append(time.perf_counter() - start)
        found[i] = ids[0]
    start = time.perf_counter()
    index.search(queries, args.k)
    batched_s = time.perf_counter() - start
    recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth)]))
    device = args.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    print(json.dumps({
        "benchmark": "knn", "n_vectors": args.n, "dim": args.dim, "index": index.kind,
        "nlist": int(getattr(getattr(index, "_index", None), "nlist", 0) or 0),
        "nprobe": args.nprobe if index.kind == "ivf" else None, "k": args.k,
        "ms_per_query": round(1000 * float(np.median(single)), 3),
        "batched_queries_per_s": round(len(queries) / batched_s, 1),
        "recall_at_10": round(recall, 4), "device": device,
        "build_s": round(build_s, 1), "generate_s": round(generated_s, 1),
        "faiss_blas_threshold": int(__import__("faiss").cvar.distance_compute_blas_threshold),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(bench_embedder(sys.argv[1:]))
