"""Prima's CLIP text tower: GPT-2 over a report summary, its last token's state projected to the image space.

The reference trained Prima as a CLIP model: a study's report summary, tokenised with GPT-2's BPE as
``text + "<|endoftext|>"`` (:mod:`models.gpt2_tokenizer`), goes through a GPT-2 (causal self-attention, pre-norm
blocks, tanh-approximated GELU, LayerNorm eps 1e-5, learned positions); the hidden state after the final
LayerNorm at the text's last token (the end-of-text) goes through ``mlp_head`` = LayerNorm -> Linear(width, 128)
-> LayerNorm, and is L2-normalised. The image side of that space is the study ViT's ``mlp_head`` applied to the
10240-d study embedding (:func:`image_embedding`). Similarities are scaled by ``exp(temperature)``.

Parameter names follow the official checkpoint's ``clipmodel.text_model.*`` tensors (GPT-2's ``wte``, ``wpe``,
``h.{i}.ln_1``, ``h.{i}.attn.c_attn`` and ``c_proj`` (GPT-2's Conv1D: weight stored as (in, out)), ``ln_2``,
``mlp.c_fc``, ``mlp.c_proj``, ``ln_f``; then ``mlp_head.{0,1,2}``), so those tensors load unchanged
(:func:`convert_reference_text_state`). ``full`` is GPT-2 small (what the reference loads); ``tiny`` keeps the
GPT-2 vocabulary and shrinks the rest, for tests and the demo.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PrimaTextConfig:
    vocab_size: int = 50257
    positions: int = 1024
    width: int = 768
    layers: int = 12
    heads: int = 12
    feature_dim: int = 128  # the CLIP space: the study ViT's mlp_head width
    eps: float = 1e-5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> PrimaTextConfig:
        return cls(**dict(data))


PRIMA_TEXT_CONFIGS = {
    "full": PrimaTextConfig(),
    # the tiny Prima's study ViT projects to 32 (models.prima.PRIMA_CONFIGS["tiny"].outer.out_dim)
    "tiny": PrimaTextConfig(positions=256, width=64, layers=2, heads=2, feature_dim=32),
}


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``x @ weight + bias`` with weight stored as (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not a multiple of {heads} heads")
        self.heads = heads
        self.c_attn = Conv1D(width, 3 * width)
        self.c_proj = Conv1D(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(out.transpose(1, 2).reshape(batch, length, width))


class GPT2MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(width, 4 * width)
        self.c_proj = Conv1D(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, config: PrimaTextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.eps)
        self.attn = CausalSelfAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = GPT2MLP(config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """Token ids (N, L) -> hidden states (N, L, width) after ``ln_f``; position ids 0..L-1, causal."""

    def __init__(self, config: PrimaTextConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.width)
        self.wpe = nn.Embedding(config.positions, config.width)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width, eps=config.eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.config.positions:
            raise ValueError(f"text of {ids.shape[1]} tokens; the tower has {self.config.positions} positions")
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class PrimaTextModel(nn.Module):
    """GPT-2 + projection head (keys ``model.*``, ``mlp_head.*``) and the CLIP temperature."""

    def __init__(self, config: PrimaTextConfig, temperature: float = math.log(1 / 0.07)) -> None:
        super().__init__()
        self.config = config
        self.model = GPT2(config)
        self.mlp_head = nn.Sequential(nn.LayerNorm(config.width), nn.Linear(config.width, config.feature_dim),
                                      nn.LayerNorm(config.feature_dim))
        # Not a parameter of ours: the reference keeps it beside the towers (``clipmodel.temperature``).
        self.temperature = float(temperature)

    @property
    def scale(self) -> float:
        """Multiplier of cosine similarities into CLIP logits (the reference's ``exp(temperature)``)."""
        return math.exp(self.temperature)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) L2-normalised text embeddings; ``lengths[i]`` tokens of row i are real."""
        if bool((lengths < 1).any()) or bool((lengths > ids.shape[1]).any()):
            raise ValueError(f"text lengths {lengths.tolist()} do not fit ids of width {ids.shape[1]}")
        hidden = self.model(ids)
        last = hidden[torch.arange(ids.shape[0], device=ids.device), lengths.to(ids.device) - 1]
        return F.normalize(self.mlp_head(last).float(), dim=-1)


def image_embedding(prima, study_embedding: torch.Tensor) -> torch.Tensor:
    """The image side of Prima's CLIP space: the study ViT's ``mlp_head`` on the 10240-d study embedding, L2-
    normalised ((B, feature_dim)). ``prima`` is a :class:`models.prima.PrimaModel`."""
    head = prima.visual.outerViT.head
    weight = next(prima.visual.outerViT.mlp_head.parameters())
    return F.normalize(head(study_embedding.to(weight.device, weight.dtype)).float(), dim=-1)


# --- checkpoint adaptation ---------------------------------------------------------------------------------------

REFERENCE_PREFIX = "clipmodel.text_model."
#: GPT-2 attention mask buffers some transformers versions save with the weights; the mask is causal by design.
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def convert_reference_text_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's ``clipmodel.text_model.*`` tensors (from a FullMRIModel or CLIP state dict) -> our keys."""
    out = {}
    for key, value in state.items():
        if key.startswith(REFERENCE_PREFIX) and not key.endswith(_MASK_BUFFERS):
            out[key[len(REFERENCE_PREFIX):]] = value
    if not out:
        raise KeyError(f"no {REFERENCE_PREFIX}* tensors in the state dict")
    return out


def text_config_of(state: Mapping[str, torch.Tensor], heads: int = 12, eps: float = 1e-5) -> PrimaTextConfig:
    """The widths of a text tower state dict in our keys (heads are not in the shapes: the checkpoint's GPT-2
    config says them)."""
    try:
        vocab, width = state["model.wte.weight"].shape
        positions = state["model.wpe.weight"].shape[0]
        feature = state["mlp_head.1.weight"].shape[0]
    except KeyError as error:
        raise KeyError(f"not a Prima text tower state dict: {error.args[0]} is missing") from None
    layers = len({key.split(".")[2] for key in state if key.startswith("model.h.")})
    return PrimaTextConfig(vocab_size=int(vocab), positions=int(positions), width=int(width), layers=layers,
                           heads=int(heads), feature_dim=int(feature), eps=float(eps))
