"""Prima's GPT-2 text tower and tokenizer against the public reference (fixture: fixtures/prima_text_parity).

The reference (MLNeurosurg/Prima e058145: transformers' GPT2Tokenizer and GPT2Model inside its GPTWrapper) was
run at a reduced size on random weights in a scratch environment outside this repository; its state dict in the
official ``clipmodel.text_model.*`` layout and its outputs are the fixture (README.md there says how).
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.gpt2_tokenizer import GPT2Tokenizer, TokenizerError, packaged_files
from models.prima_text import (
    PRIMA_TEXT_CONFIGS,
    PrimaTextConfig,
    PrimaTextModel,
    convert_reference_text_state,
    text_config_of,
)
from models.reference_checkpoint import load_reference_prima_text

FIXTURES = Path(__file__).parents[1] / "fixtures"
PARITY = FIXTURES / "prima_text_parity" / "text_parity.npz"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(PARITY) as data:
        return {k: data[k] for k in data.files}


def reference_state(expected) -> dict[str, torch.Tensor]:
    state = {k.replace("__", "."): torch.from_numpy(v) for k, v in expected.items() if k.startswith("clipmodel__")}
    wte = torch.from_numpy(expected["wte_int8"]).float() * float(expected["wte_scale"])
    state["clipmodel.text_model.model.wte.weight"] = wte
    return state


@pytest.fixture(scope="module")
def tower(expected) -> PrimaTextModel:
    state = convert_reference_text_state(reference_state(expected))
    config = text_config_of(state, heads=json.loads(str(expected["config"]))["n_head"])
    model = PrimaTextModel(config, temperature=float(expected["temperature"][0]))
    model.load_state_dict(state, strict=True)  # the official names, unchanged but for the prefix
    return model.eval()


def test_tokenizer_gives_the_reference_ids_including_the_end_token_and_the_cut(expected) -> None:
    tokenizer = GPT2Tokenizer()
    for text, row, length in zip(expected["texts"], expected["ids"], expected["lengths"]):
        assert tokenizer.prompt_ids(str(text)) == row[:length].tolist(), text
    long_ids = tokenizer.prompt_ids(str(expected["texts"][-1]))
    assert len(long_ids) == 200 and long_ids[-1] == tokenizer.eos_id == 50256


def test_text_tower_matches_the_reference_at_the_last_token(expected, tower) -> None:
    ids = torch.from_numpy(expected["ids"])
    lengths = torch.from_numpy(expected["lengths"])
    with torch.inference_mode():
        hidden = tower.model(ids)
        last = hidden[torch.arange(len(ids)), lengths - 1]
        embedding = tower(ids, lengths)
    assert np.abs(last.numpy() - expected["last_hidden"]).max() <= 1e-5
    assert np.abs(embedding.numpy() - expected["embedding"]).max() <= 1e-5
    assert tower.scale == pytest.approx(np.exp(0.37))


def test_our_padding_and_tokenizer_give_the_reference_embeddings(expected, tower) -> None:
    """End to end from text: our batch pads with end-of-text, the reference's collate with 0 (causal: no
    difference)."""
    ids, lengths = GPT2Tokenizer().batch([str(t) for t in expected["texts"]])
    with torch.inference_mode():
        embedding = tower(ids, lengths)
    assert np.abs(embedding.numpy() - expected["embedding"]).max() <= 1e-5


def test_tokenizer_refuses_files_that_are_not_gpt2s(tmp_path: Path) -> None:
    shutil.copy(packaged_files() / "encoder.json", tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nĠ t\n")
    with pytest.raises(TokenizerError, match="vocab.bpe: not OpenAI's GPT-2"):
        GPT2Tokenizer(tmp_path)
    GPT2Tokenizer(tmp_path, verify=False)  # another vocabulary of the same format is the caller's choice


def test_reduced_reference_pickle_gives_its_text_tower_through_the_safe_loader() -> None:
    """fullmodel_reduced.pt (the Prima parity fixture) names a 0-layer GPT-2 inside the whole pickled model."""
    text = load_reference_prima_text(FIXTURES / "prima_parity" / "fullmodel_reduced.pt")
    assert text.config.layers == 0 and text.config.vocab_size == 16 and text.config.feature_dim == 16
    model = text.build_model()
    with torch.inference_mode():
        out = model(torch.tensor([[3, 5, 7]]), torch.tensor([3]))
    assert out.shape == (1, 16) and torch.allclose(out.norm(dim=1), torch.ones(1))


@pytest.mark.slow
def test_full_size_official_checkpoint_text_tower_loads_through_the_safe_loader(tmp_path: Path) -> None:
    """The published layout at full size (GPT-2 small, 12 layers, 12 heads from the pickled GPT2Config), read
    without running code from the file; with random values the tower embeds prompts end to end."""
    path = tmp_path / "primafullmodel107.pt"
    with gzip.open(FIXTURES / "prima_parity" / "fullmodel_fullsize_strided.pt.gz", "rb") as src, \
            open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)

    text = load_reference_prima_text(path)

    assert text.config == PRIMA_TEXT_CONFIGS["full"]
    model = text.build_model()
    assert sum(p.numel() for p in model.parameters()) == 124_439_808 + 768 * 2 + 768 * 128 + 128 + 128 * 2
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    ids, lengths = GPT2Tokenizer().batch(["acute subdural hematoma", "no acute intracranial abnormality"])
    with torch.inference_mode():
        out = model(ids, lengths)
    assert out.shape == (2, 128) and torch.allclose(out.norm(dim=1), torch.ones(2))
    assert not torch.allclose(out[0], out[1])


def test_config_round_trips_as_data() -> None:
    config = PRIMA_TEXT_CONFIGS["tiny"]
    assert PrimaTextConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
