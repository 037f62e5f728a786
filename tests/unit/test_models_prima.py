"""Study encoder and heads (models.prima, models.heads, models.transformer, models.text_encoder)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from models.heads import StackedMLPHeads
from models.labels import DIAGNOSIS_NAMES
from models.prima import (
    PRIMA_CONFIGS,
    HierViT,
    PrimaBatch,
    PrimaModel,
    convert_reference_state_dict,
    series_name_variant,
)
from models.text_encoder import END_ID, UNKNOWN_ID, text_to_ids, texts_to_tensor
from models.transformer import Attention

TINY = PRIMA_CONFIGS["tiny"]


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_hiervit_has_the_reference_keys_and_shapes() -> None:
    with torch.device("meta"):
        state = shapes(HierViT(PRIMA_CONFIGS["full"]))

    expected = {
        "innerViT.cls_token": (1, 20, 289),
        "innerViT.transformer.layers.14.0.norm.weight": (289,),
        "innerViT.transformer.layers.0.0.fn.to_qkv.weight": (3072, 289),
        "innerViT.transformer.layers.0.0.fn.to_out.0.weight": (289, 1024),
        "innerViT.transformer.layers.0.1.fn.net.0.weight": (1024, 289),
        "innerViT.transformer.layers.0.1.fn.net.3.weight": (289, 1024),
        "innerViT.layernorm.weight": (289,),
        "innerViT.mlp_head.0.weight": (1024, 5780),
        "outerViT.cls_token": (1, 10, 1024),
        "outerViT.transformer.layers.3.0.fn.to_qkv.weight": (1536, 1024),
        "outerViT.transformer.layers.3.0.fn.to_out.0.weight": (1024, 512),
        "outerViT.mlp_head.0.weight": (128, 10240),
        "serieencoder.0.embed.weight": (47, 246),
        "serieencoder.0.transformer.layers.2.0.fn.to_qkv.weight": (768, 256),
        "serieencoder.0.transformer.layers.0.1.fn.net.0.weight": (300, 256),
        "serieencoder.0.linear.weight": (128, 256),
        "serieencoder.1.weight": (289, 256),
        "studyencoder.embed.weight": (47, 246),
        "studyencoder.linear.weight": (1024, 256),
    }
    assert {k: state[k] for k in expected} == expected
    assert "innerViT.transformer.layers.15.0.norm.weight" not in state  # depth 15
    assert "outerViT.transformer.layers.4.0.norm.weight" not in state  # depth 4
    assert not any("to_qkv.bias" in k for k in state)
    # The reference's 56,584,305 parameters less the training-only patdisnet (5780->500->128).
    assert sum(torch.Size(s).numel() for s in state.values()) == 56_584_305 - (
        5780 * 500 + 500 + 500 * 128 + 128
    )


def test_series_name_encoder_variant_b_has_its_own_key_layout() -> None:
    with torch.device("meta"):
        variant_b = shapes(HierViT(replace(PRIMA_CONFIGS["full"], series_name_variant="B")))
    assert variant_b["serieencoder.embed.weight"] == (47, 246)
    assert variant_b["serieencoder.linear.weight"] == (289, 256)
    assert series_name_variant({f"visual.{k}": None for k in variant_b}) == "B"  # type: ignore[misc]


def test_full_diagnosis_heads_use_the_per_head_layout_of_the_checkpoint() -> None:
    with torch.device("meta"):  # 52 x 45 M parameters: never allocated in tests
        model = PrimaModel(PRIMA_CONFIGS["full"], diagnosis_outputs=52)
        state = shapes(model)

    head_keys = [k for k in state if k.startswith("diagnosis_heads.")]
    assert len(head_keys) == 52 * 6
    for k in (0, 51):
        assert state[f"diagnosis_heads.{k}.0.weight"] == (4000, 10240)
        assert state[f"diagnosis_heads.{k}.0.bias"] == (4000,)
        assert state[f"diagnosis_heads.{k}.2.weight"] == (1000, 4000)
        assert state[f"diagnosis_heads.{k}.4.weight"] == (52, 1000)
        assert state[f"diagnosis_heads.{k}.4.bias"] == (52,)
    per_head = sum(torch.Size(state[k]).numel() for k in head_keys if k.startswith("diagnosis_heads.0."))
    assert per_head == 45_017_052


def independent_heads(n_heads: int, dims: tuple[int, ...]) -> nn.ModuleList:
    """The reference's form: one nn.Sequential(Linear, ReLU, Linear, ReLU, Linear) per head."""
    heads = []
    for _ in range(n_heads):
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
        heads.append(nn.Sequential(*layers[:-1]))
    return nn.ModuleList(heads)


def test_batched_heads_equal_evaluating_each_head_on_its_own() -> None:
    torch.manual_seed(0)
    reference = independent_heads(7, (40, 30, 20, 9))
    stacked = StackedMLPHeads(7, 40, (30, 20), 9)
    stacked.load_state_dict(reference.state_dict())  # per-head layout in
    columns, thresholds = [3, 0, 8, 8, 1, 2, 5], [0.1, -0.2, 0.0, 1.5, 0.3, -1.0, 0.25]
    stacked.set_columns_and_thresholds(columns, thresholds)

    x = torch.randn(5, 40)
    expected = torch.stack([reference[k](x)[:, columns[k]] - thresholds[k] for k in range(7)], dim=1)
    assert torch.allclose(stacked(x), expected, atol=1e-6)
    assert torch.allclose(stacked.all_outputs(x)[:, 2], reference[2](x), atol=1e-6)

    round_trip = independent_heads(7, (40, 30, 20, 9))
    round_trip.load_state_dict(stacked.state_dict())  # per-head layout out
    assert all(
        torch.equal(a, b) for a, b in zip(round_trip.state_dict().values(), reference.state_dict().values())
    )


def test_heads_refuse_a_state_dict_with_missing_or_misshapen_heads() -> None:
    stacked = StackedMLPHeads(3, 8, (6,), 4)
    state = independent_heads(2, (8, 6, 4)).state_dict()
    with pytest.raises(RuntimeError, match="Missing key.*2.0.weight"):
        stacked.load_state_dict(state)
    with pytest.raises(RuntimeError, match="size mismatch for 0.0.weight"):
        stacked.load_state_dict(independent_heads(3, (8, 5, 4)).state_dict())


def test_attention_splits_qkv_then_heads_and_attends_only_within_each_sequence() -> None:
    torch.manual_seed(1)
    heads, dim_head, dim = 3, 8, 20
    attention = Attention(dim, heads, dim_head)
    lengths = [5, 2]
    x = torch.randn(2, 5, dim)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = attention(x, mask)

    for b, n in enumerate(lengths):  # the reference's packed formulation, one sequence at a time
        qkv = attention.to_qkv(x[b, :n]).view(n, 3, heads, dim_head)
        q, k, v = (qkv[:, i].transpose(0, 1) for i in range(3))  # (heads, n, dim_head)
        weights = torch.softmax(q @ k.transpose(1, 2) * dim_head**-0.5, dim=-1)
        expected = attention.to_out((weights @ v).transpose(0, 1).reshape(n, heads * dim_head))
        assert torch.allclose(out[b, :n], expected, atol=1e-6)


def tiny_study(seed: int, series_lengths: list[int]) -> list[tuple[torch.Tensor, str]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 289, generator=generator), f"SERIES {i}+C") for i, n in enumerate(series_lengths)]


def test_study_embedding_does_not_depend_on_padding_batch_company_or_order() -> None:
    torch.manual_seed(0)
    model = PrimaModel(TINY).eval()
    study = tiny_study(0, [30, 47])
    other = tiny_study(1, [90, 26, 33])

    with torch.inference_mode():
        alone = model(PrimaBatch.from_studies([study], ["MRI BRAIN"]))
        batched = model(PrimaBatch.from_studies([other, study], ["MRI BRAIN", "MRI BRAIN"]))
        shuffled = [(tokens[torch.randperm(len(tokens))], name) for tokens, name in reversed(study)]
        reordered = model(PrimaBatch.from_studies([shuffled], ["MRI BRAIN"]))

    assert alone.embedding.shape == (1, TINY.embedding_dim)
    assert torch.allclose(batched.embedding[1], alone.embedding[0], atol=1e-5)
    assert torch.allclose(batched.diagnosis_logits[1], alone.diagnosis_logits[0], atol=1e-5)
    assert torch.allclose(reordered.embedding, alone.embedding, atol=1e-5)
    assert alone.diagnosis_logits.shape == (1, 52) and alone.priority_logits.shape == (1, 3)
    assert torch.equal(alone.diagnosis_probs, torch.sigmoid(alone.diagnosis_logits))


def test_series_names_become_character_ids_with_an_end_token() -> None:
    assert text_to_ids("AX_T1+c") == [1, 24, 27, 20, 31, 28, 3, END_ID]  # a x _ t 1 + c
    assert text_to_ids("a b")[1] == UNKNOWN_ID
    ids = texts_to_tensor(["ab", "abcd"])
    assert ids.tolist() == [[1, 2, END_ID, 0, 0], [1, 2, 3, 4, END_ID]]


def test_name_encoder_reads_the_end_token_and_ignores_padding() -> None:
    torch.manual_seed(0)
    encoder = HierViT(TINY).studyencoder.eval()
    with torch.inference_mode():
        short_alone = encoder(texts_to_tensor(["t1"]))
        short_padded = encoder(texts_to_tensor(["t1", "a much longer description"]))[0]
    assert torch.allclose(short_alone[0], short_padded, atol=1e-5)


def test_reference_state_dict_converts_to_ours() -> None:
    torch.manual_seed(0)
    model = PrimaModel(TINY)
    ours = model.state_dict()
    renamed = {}
    for key, value in ours.items():
        for new, old in (
            ("visual.", "clipvisualmodel."),
            ("diagnosis_heads.", "m1."),
            ("referral_heads.", "m2."),
            ("priority_head.", "priorityhead."),
        ):
            if key.startswith(new):
                renamed[old + key[len(new) :]] = value
    renamed["clipmodel.visual_model.innerViT.cls_token"] = torch.zeros(1)  # the duplicate view
    renamed["clipvisualmodel.patdisnet.0.weight"] = torch.zeros(1)
    renamed["clipvisualmodel.dummy_param"] = torch.zeros(0)

    converted = convert_reference_state_dict(renamed)
    fresh = PrimaModel(TINY)
    fresh.load_state_dict(converted)  # strict
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in ours.items())
    assert series_name_variant(converted) == "A"
    assert len(DIAGNOSIS_NAMES) == fresh.diagnosis_heads.n_heads


def test_full_size_encoder_produces_the_published_embedding_width() -> None:
    """Full HierViT (53.6 M parameters, no heads) on a small study: 10 registers x 1024 = 10240."""
    torch.manual_seed(0)
    visual = HierViT(PRIMA_CONFIGS["full"]).eval()
    with torch.inference_mode():
        embedding = visual(
            PrimaBatch.from_studies([tiny_study(0, [30, 26])], ["MRI BRAIN WO AND W CONTRAST"])
        )
    assert embedding.shape == (1, 10240) and torch.isfinite(embedding).all()
