"""MedImageInsight: parity with the public reference on random weights, strict loading of the official file layout,
the CLIP tokenizer, and timm's davit_huge_fl as an independent oracle for the image tower."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.clip_tokenizer import ClipTokenizer
from models.medimageinsight import (
    FULL,
    TINY,
    CheckpointMismatch,
    MedImageInsight,
    check_checkpoint,
    load_medimageinsight,
    official_state_dict,
    official_to_model,
    read_safetensors_header,
)
from models.slice_input import model_input
from tests.support.medimageinsight import random_official_weights, write_safetensors_streaming

FIXTURES = Path(__file__).parents[1] / "fixtures" / "medimageinsight"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "reference_tiny.npz"))


@pytest.fixture(scope="module")
def inputs():
    return json.loads((FIXTURES / "inputs.json").read_text())


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """The random weights the reference ran with, as a safetensors file under the official names."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in official_state_dict(MedImageInsight(TINY, device="meta")).items()}
    path = tmp_path_factory.mktemp("mi2") / "tiny.safetensors"
    save_file(random_official_weights(shapes), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_file):
    return load_medimageinsight(tiny_file, TINY)


def _pictures(inputs) -> list[np.ndarray]:
    return [np.array(Image.open(FIXTURES / "images" / name)) for name in inputs["images"]]


def test_tokenizer_gives_the_reference_ids_and_masks(reference, inputs):
    ids, mask = ClipTokenizer()(inputs["texts"])
    np.testing.assert_array_equal(ids.numpy(), reference["input_ids"])
    np.testing.assert_array_equal(mask.numpy(), reference["attention_mask"])


def test_tokenizer_matches_the_documented_example_and_truncates_to_77():
    tokenizer = ClipTokenizer()
    ids, mask = tokenizer(["x-ray chest anteroposterior Pneumonia", "word " * 200])
    assert ids[0, :11].tolist() == [49406, 343, 268, 3077, 10563, 514, 20727, 22881, 2498, 42906, 49407]
    assert int(mask[0].sum()) == 11 and ids[0, 11:].eq(49407).all()
    assert int(mask[1].sum()) == 77 and ids[1, 76] == 49407 and tokenizer.vocab_size == 49408


def test_preprocessing_is_bit_exact_with_the_reference(reference, inputs):
    pictures = _pictures(inputs)
    for size in (480, 224):
        mine = model_input(pictures, size)[:, :, ::8, ::8].numpy()
        np.testing.assert_array_equal(mine, reference[f"pixels_{size}_strided"])


@pytest.mark.parametrize("size", [480, 224])
def test_image_embeddings_match_the_reference(tiny_model, reference, inputs, size):
    with torch.inference_mode():
        x = model_input(_pictures(inputs), size)
        features = tiny_model.image_features(x).numpy()
        embeddings = tiny_model.encode_image(x).numpy()
    assert _cosines(features, reference[f"image_features_{size}"]).min() >= 0.99999
    assert _cosines(embeddings, reference[f"image_embeddings_{size}"]).min() >= 0.99999
    np.testing.assert_allclose(embeddings, reference[f"image_embeddings_{size}"], atol=1e-4)


def test_text_embeddings_match_the_reference(tiny_model, reference, inputs):
    ids, mask = ClipTokenizer()(inputs["texts"])
    with torch.inference_mode():
        hidden = tiny_model.lang_encoder(ids, mask)[:, :8].numpy()
        embeddings = tiny_model.encode_text(ids, mask).numpy()
    np.testing.assert_allclose(hidden, reference["text_hidden"], atol=1e-4)
    assert _cosines(embeddings, reference["text_embeddings"]).min() >= 0.99999
    assert tiny_model.scale == pytest.approx(float(reference["logit_scale_exp"]), rel=1e-6)


def test_full_network_has_exactly_the_official_tensor_names_and_shapes():
    """The names and shapes the reference's full model has (from the fixture) are those the full network needs."""
    official = {k: tuple(v) for k, v in json.loads((FIXTURES / "full_official_shapes.json").read_text()).items()}
    assert len(official) == 601 and sum(int(np.prod(s)) for s in official.values()) == 615_996_417
    renamed = check_checkpoint({k: ("F32", s) for k, s in official.items()}, FULL)
    assert renamed["image_encoder.norms.weight"] == "image_encoder.head.norm.weight"
    assert sum(k.startswith("image_encoder.") for k in official) == 402
    assert sum(k.startswith("lang_encoder.") for k in official) == 196
    with torch.device("meta"):
        assert {k: tuple(v.shape) for k, v in official_state_dict(MedImageInsight(FULL, device="meta")).items()} \
            == official


def test_a_file_that_does_not_fit_is_refused_with_every_difference_named(tmp_path):
    official = {k: tuple(v) for k, v in json.loads((FIXTURES / "full_official_shapes.json").read_text()).items()}
    header = {k: ("F32", s) for k, s in official.items()}
    del header["image_encoder.norms.bias"]
    header["image_projection"] = ("F32", (2048, 512))
    header["image_encoder.extra.weight"] = ("F32", (3,))
    with pytest.raises(CheckpointMismatch) as err:
        check_checkpoint(header, FULL, where="weights.pt")
    message = str(err.value)
    assert "image_encoder.head.norm.bias: missing" in message
    assert "image_projection: shape [2048, 512]" in message
    assert "image_encoder.extra.weight: unexpected" in message
    with pytest.raises(CheckpointMismatch, match="not fit MedImageInsight 'tiny'"):
        check_checkpoint(header, TINY)
    pickle_like = tmp_path / "weights.pt"
    pickle_like.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(CheckpointMismatch, match="not a safetensors file"):
        read_safetensors_header(pickle_like)


def test_tiny_file_loads_strictly_and_every_tensor_lands(tiny_file):
    from safetensors.torch import load_file

    model = load_medimageinsight(tiny_file, TINY)
    state = model.state_dict()
    written = load_file(str(tiny_file))
    assert len(written) == len(state)
    for name, tensor in written.items():
        assert torch.equal(state[official_to_model(name)], tensor), name
    assert not model.training


def test_timm_davit_huge_fl_is_the_same_image_tower_as_the_full_config():
    """Independent oracle: timm's registered davit_huge_fl has the parameter names and shapes of FULL."""
    import timm

    with torch.device("meta"):
        oracle = timm.create_model("davit_huge_fl", num_classes=0, pretrained=False)
        mine = MedImageInsight(FULL, device="meta").image_encoder
    assert {k: v.shape for k, v in oracle.state_dict().items()} == {k: v.shape for k, v in mine.state_dict().items()}


@pytest.mark.slow
def test_a_full_size_file_with_the_official_layout_loads_strictly(tmp_path):
    """601 tensors, 2.5 GB of random values under the official names and shapes, into ``full`` (written one
    tensor at a time: the peak memory is the loaded model's)."""
    official = {k: tuple(v) for k, v in json.loads((FIXTURES / "full_official_shapes.json").read_text()).items()}
    path = tmp_path / "medimageinsigt-v1.0.0.pt"
    generator = torch.Generator().manual_seed(0)
    write_safetensors_streaming(path, official, lambda name, shape: torch.randn(shape, generator=generator) * 0.02)
    header_bytes = int.from_bytes(path.open("rb").read(8), "little")
    assert path.stat().st_size - 8 - header_bytes == 2_463_985_668  # the official file's data size exactly
    model = load_medimageinsight(path, FULL)
    assert sum(p.numel() for p in model.parameters()) == 615_996_417
    with torch.inference_mode():
        out = model.encode_image(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 1024) and torch.isfinite(out).all()
