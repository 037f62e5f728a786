"""The encoder benchmark's registration and FLOP counting (models.bench_encoder); it runs on a GPU test."""

from __future__ import annotations

import torch

from models.bench_encoder import counted_flops
from models.vqvae import build_vqvae


def test_encoder_benchmark_is_registered_with_the_cli() -> None:
    from worker.cli import BENCHMARKS

    assert BENCHMARKS["encoder"] == "models.bench_encoder:bench"


def test_vqvae_costs_the_reference_16_48_gflop_per_token_at_8_slices() -> None:
    with torch.device("meta"):
        vqvae = build_vqvae("full").eval()
        flops = counted_flops(lambda: vqvae.encode(torch.empty(1, 1, 8, 32, 32)))
    assert round(flops / 1e9, 2) == 16.48
