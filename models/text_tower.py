"""The MedImageInsight text tower: a bidirectional CLIP-style transformer over BPE tokens.

Structure and parameter names follow the official checkpoint's ``lang_encoder.*`` tensors, so that file loads
unchanged: ``token_embedding``, a bare ``positional_embedding`` (context x width), pre-LayerNorm residual blocks
(``ln_1`` -> ``attn`` (``nn.MultiheadAttention``) and ``ln_2`` -> ``mlp.c_fc`` -> QuickGELU -> ``mlp.c_proj``),
``ln_final``. Unlike OpenAI CLIP there is no causal mask: every token attends to every unpadded token (the key
padding mask comes from the attention mask). LayerNorms use eps 1e-12 with statistics in float32.
The sentence feature is the row of the first end-of-text token (EOS is also the pad id, so ``argmax`` of the ids
finds it), which the model then projects.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TextTowerConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    heads: int = 16
    layers: int = 16


class FloatLayerNorm(nn.Module):
    """LayerNorm with the variance epsilon inside the square root and statistics in float32 (eps 1e-12)."""

    def __init__(self, width: int, eps: float = 1e-12, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, device=device))
        self.bias = nn.Parameter(torch.zeros(width, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        centred = x - x.mean(-1, keepdim=True)
        x = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype) + self.bias


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int, device=None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, device=device)
        self.ln_1 = FloatLayerNorm(width, device=device)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4, device=device)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width, device=device)),
        ]))
        self.ln_2 = FloatLayerNorm(width, device=device)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        # x is (sequence, batch, width), as nn.MultiheadAttention takes it by default.
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TextTower(nn.Module):
    """Token ids and attention mask -> per-token hidden states (N, context, width)."""

    def __init__(self, config: TextTowerConfig, device=None) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width, device=device)
        self.positional_embedding = nn.Parameter(torch.zeros(config.context_length, config.width, device=device))
        self.resblocks = nn.ModuleList(TextBlock(config.width, config.heads, device=device)
                                       for _ in range(config.layers))
        self.ln_final = FloatLayerNorm(config.width, device=device)
        if device is None or torch.device(device).type != "meta":
            nn.init.trunc_normal_(self.positional_embedding, std=0.02)
            nn.init.trunc_normal_(self.token_embedding.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] != self.config.context_length:
            raise ValueError(f"text input has {input_ids.shape[1]} positions; the tower takes exactly "
                             f"{self.config.context_length} (pad with the tokenizer)")
        padding = attention_mask == 0
        x = self.token_embedding(input_ids) + self.positional_embedding
        x = x.permute(1, 0, 2)
        for block in self.resblocks:
            x = block(x, padding)
        return self.ln_final(x.permute(1, 0, 2))

    @staticmethod
    def pooled(hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state at the first end-of-text token of each sequence (the highest id; argmax takes the
        first occurrence)."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]
