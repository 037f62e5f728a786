"""``triage bench encoder``: study-encoder throughput at the published size, in studies/s and TFLOP/s.

A typical study (``reference/performance.md`` §2): 8 series of 240 foreground tokens = 1,920 patches of
4 x 32 x 32, each repeated to 8 slices for the VQ-VAE as the reference does, then the HierViT (and, on a GPU, the
52 diagnosis heads). FLOPs are counted the way the reference's figures were (torch's FlopCounter, 2 FLOP per
multiply-add): 16.48 GFLOP per token for the VQ-VAE encoder, the HierViT and heads counted on the actual batch.
``peak_fraction`` divides the achieved rate by a dense GEMM measured on the same device in the same precision.

On a GPU: bf16 weights, cuDNN autotuning, several studies per batch. On a CPU the full study takes many minutes
(0.3 s per token), so the VQ-VAE runs on a few tokens and its time per token is scaled to the study; the JSON
says so (``tokens_measured``, ``extrapolated``). The last line printed is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.prima import PRIMA_CONFIGS, PrimaBatch, PrimaModel
from models.tokenizer import token_features, vqvae_input
from models.vqvae import build_vqvae

SERIES_PER_STUDY = 8
TOKENS_PER_SERIES = 240
PATCH = (4, 32, 32)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gemm_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matrix-multiply throughput on ``device`` in ``dtype`` (the denominator of peak_fraction)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timed(lambda: a @ b, device, 10 if device.type == "cuda" else 3)
    return 2 * n**3 / seconds / 1e12


def counted_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _study_tokens(
    n_series: int, tokens: int, device: torch.device, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches in [0, 1) of axial series and their patch-grid positions."""
    patches = torch.rand(n_series * tokens, *PATCH, generator=generator).to(device)
    grid = torch.stack(
        [
            torch.randint(0, 8, (n_series * tokens,), generator=generator),
            torch.randint(0, 8, (n_series * tokens,), generator=generator),
            torch.randint(0, 8, (n_series * tokens,), generator=generator),
        ],
        dim=1,
    )
    return patches, grid


class _GridTokens:
    """Just what token_features needs from SeriesTokens."""

    def __init__(self, grid: torch.Tensor) -> None:
        self.thin_axis = 0
        self.token_patch = torch.arange(len(grid)).numpy()
        self.grid_index = grid.numpy()


def bench(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="triage bench encoder", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    parser.add_argument("--studies", type=int, default=None, help="studies per batch (default 8 GPU, 1 CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 10 GPU, 1 CPU)")
    parser.add_argument("--chunk", type=int, default=4096, help="patches per VQ-VAE call on the GPU")
    parser.add_argument("--cpu-tokens", type=int, default=16, help="VQ-VAE tokens measured on a CPU")
    parser.add_argument("--heads", choices=("auto", "yes", "no"), default="auto", help="include the 52 heads")
    args = parser.parse_args(list(argv))

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    studies = args.studies or (8 if on_gpu else 1)
    repeats = args.repeats or (10 if on_gpu else 1)
    with_heads = args.heads == "yes" or (args.heads == "auto" and on_gpu)  # 9.4 GB of fp32 heads on a CPU
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    vqvae = build_vqvae("full").eval().to(device=device, dtype=dtype)
    with torch.device("meta"):
        prima = PrimaModel(PRIMA_CONFIGS["full"], diagnosis_outputs=52)
    if not with_heads:
        prima.diagnosis_heads = prima.referral_heads = prima.priority_head = None  # type: ignore[assignment]
    prima.to_empty(device=device)
    with torch.no_grad():
        for parameter in prima.parameters():
            parameter.normal_(0, 0.02)
    prima = prima.to(dtype).eval()
    if with_heads:
        prima.diagnosis_heads.set_columns_and_thresholds(list(range(52)), [0.0] * 52)

    tokens_per_study = SERIES_PER_STUDY * TOKENS_PER_SERIES
    patches, grid = _study_tokens(SERIES_PER_STUDY * studies, TOKENS_PER_SERIES, device, generator)
    with torch.inference_mode():
        latents_one = vqvae.encode(vqvae_input(patches[:1].to(dtype), 0))
        flat_tokens = token_features(
            latents_one.float().expand(len(patches), -1, -1, -1, -1), _GridTokens(grid)
        )
        series = list(flat_tokens.to(dtype).split(TOKENS_PER_SERIES))
        batch = PrimaBatch.from_studies(
            [
                [
                    (s, f"AX SERIES {i}")
                    for i, s in enumerate(series[b * SERIES_PER_STUDY : (b + 1) * SERIES_PER_STUDY])
                ]
                for b in range(studies)
            ],
            ["MRI BRAIN WO AND W CONTRAST"] * studies,
        )

        def run_vqvae(chunk: torch.Tensor) -> torch.Tensor:
            out = [vqvae.encode(vqvae_input(c.to(dtype), 0)) for c in chunk.split(args.chunk)]
            return torch.cat(out)

        def run_vit() -> torch.Tensor:
            embedding = prima.visual(batch)
            if with_heads:
                return prima.heads(embedding).diagnosis_logits
            return embedding

        with torch.device("meta"):
            vq_meta = build_vqvae("full").eval()
            vq_flops_per_token = counted_flops(lambda: vq_meta.encode(torch.empty(1, 1, 8, 32, 32)))
        vit_flops = counted_flops(run_vit) / studies

        if on_gpu:
            vq_seconds = _timed(lambda: run_vqvae(patches), device, repeats) / studies
            tokens_measured = len(patches)
        else:
            tokens_measured = min(args.cpu_tokens, len(patches))
            vq_seconds = (
                _timed(lambda: run_vqvae(patches[:tokens_measured]), device, repeats)
                / tokens_measured
                * tokens_per_study
            )
        vit_seconds = _timed(run_vit, device, repeats) / studies

    study_seconds = vq_seconds + vit_seconds
    flops_per_study = vq_flops_per_token * tokens_per_study + vit_flops
    tflops = flops_per_study / study_seconds / 1e12
    peak = gemm_peak_tflops(device, dtype)
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    result = {
        "benchmark": "encoder",
        "studies_per_s": round(1 / study_seconds, 4),
        "tflops": round(tflops, 4),
        "peak_fraction": round(tflops / peak, 4),
        "peak_tflops": round(peak, 3),
        "peak_source": "dense torch.matmul measured on this device in this precision",
        "device": name,
        "precision": "bf16" if on_gpu else "fp32",
        "config": "full",
        "series_per_study": SERIES_PER_STUDY,
        "tokens_per_series": TOKENS_PER_SERIES,
        "tokens_per_study": tokens_per_study,
        "vq_gflop_per_token": round(vq_flops_per_token / 1e9, 3),
        "vit_and_heads_gflop_per_study": round(vit_flops / 1e9, 2),
        "gflop_per_study": round(flops_per_study / 1e9, 1),
        "heads": with_heads,
        "studies_per_batch": studies,
        "repeats": repeats,
        "tokens_measured": tokens_measured,
        "extrapolated": not on_gpu,
        "stage_ms_per_study": {"vqvae": round(vq_seconds * 1e3, 2), "vit_heads": round(vit_seconds * 1e3, 2)},
    }
    if not on_gpu:
        print(
            f"CPU: VQ-VAE measured on {tokens_measured} tokens and scaled to {tokens_per_study}; "
            "the HierViT ran on the whole study",
            flush=True,
        )
    print(json.dumps(result), flush=True)
    return 0
