"""GPU paths of the models (bf16 autocast, batching, LIME, the encoder benchmark); skipped without CUDA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.bundle import random_bundle
from models.explanations import diagnosis_logit, explain_series
from models.inference import StudyPredictor
from models.volume import load_study
from models.vqvae import build_vqvae, encode_patches
from tests.support.mr_series import write_head_study

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory):
    return load_study(write_head_study(tmp_path_factory.mktemp("study")))[0]


def test_bf16_on_the_gpu_agrees_with_fp32_on_the_cpu(volumes) -> None:
    bundle = random_bundle("tiny", seed=0)
    cpu = StudyPredictor(bundle, device="cpu").predict(volumes)
    gpu = StudyPredictor(random_bundle("tiny", seed=0), device="cuda").predict(volumes)

    relative = np.linalg.norm(gpu.embedding - cpu.embedding) / np.linalg.norm(cpu.embedding)
    assert relative < 3e-2
    assert max(abs(gpu.diagnosis_probs[k] - cpu.diagnosis_probs[k]) for k in cpu.diagnosis_probs) < 0.05
    assert gpu.tokens_per_series == cpu.tokens_per_series


def test_batched_studies_on_the_gpu_equal_one_at_a_time(volumes) -> None:
    predictor = StudyPredictor(random_bundle("tiny", seed=1), device="cuda")
    one, two = predictor.predict(volumes), predictor.predict(volumes[1:])
    batch = predictor.predict_batch([volumes[1:], volumes])
    assert np.allclose(batch[1].embedding, one.embedding, atol=2e-2, rtol=2e-2)
    assert np.allclose(batch[0].embedding, two.embedding, atol=2e-2, rtol=2e-2)


def test_full_size_vqvae_in_bf16_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    vqvae = build_vqvae("full").cuda().eval()
    patches = torch.rand(64, 1, 8, 32, 32, device="cuda")
    with torch.inference_mode():
        fp32 = encode_patches(vqvae, patches)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = encode_patches(vqvae, patches).float()
    assert (bf16 - fp32).norm() / fp32.norm() < 2e-2


def test_lime_on_the_gpu_gives_the_cpu_labels_in_fp32() -> None:
    bundle = random_bundle("tiny", seed=2)
    generator = torch.Generator().manual_seed(0)
    study = [(torch.randn(n, 289, generator=generator), f"SERIES {i}") for i, n in enumerate((40, 31))]
    results = []
    for device in ("cpu", "cuda"):
        model = bundle.prima.to(device)
        results.append(
            explain_series(
                model,
                [(t.to(device), n) for t, n in study],
                "MRI BRAIN",
                0,
                diagnosis_logit(model, "structural_edema"),
                samples=64,
                batch_size=16,
            )
        )
    assert np.allclose(results[0].labels, results[1].labels, atol=1e-3)


def test_encoder_benchmark_runs_on_the_gpu_and_prints_its_json_last(capsys) -> None:
    from models.bench_encoder import bench

    assert bench(["--studies", "1", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"studies_per_s", "tflops", "peak_fraction", "device", "precision", "config"} <= set(result)
    assert result["precision"] == "bf16" and result["config"] == "full" and not result["extrapolated"]
    assert result["tokens_per_study"] == 1920 and 31_000 < result["gflop_per_study"] < 33_000
