"""Transformer building blocks of Prima's ViTs, with the reference's state-dict key names.

Pre-norm blocks (``reference/prima.md`` §4): ``layers.{i}.0`` = LayerNorm + multi-head attention (``to_qkv``
without bias, q|k|v then heads in its output, ``to_out.0``), ``layers.{i}.1`` = LayerNorm + MLP (``net.0`` Linear,
exact GELU, ``net.3`` Linear). No final norm. The reference packs sequences for flash-attention's varlen kernel;
we pad and pass a key-padding mask to ``scaled_dot_product_attention``, which attends within each sequence
just the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def key_padding_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_length) bool, True for real positions."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim))  # index 0 as in the checkpoint

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.to_qkv(x).view(batch, length, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]  # padded keys take no attention
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # scale dim_head ** -0.5
        return self.to_out(out.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # Identity stands where the reference has Dropout(0), so the second Linear keeps the key "net.3".
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        return self.fn(self.norm(x), *args)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PreNorm(dim, Attention(dim, heads, dim_head)), PreNorm(dim, FeedForward(dim, mlp_dim))]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for attention, feed_forward in self.layers:  # type: ignore[misc]
            x = attention(x, mask) + x
            x = feed_forward(x) + x
        return x


class RegisterViT(nn.Module):
    """A sequence ViT without positional embedding whose output is its register tokens.

    ``registers`` learned tokens (``cls_token``) go in front of each sequence; the output is every register's
    final state through ``layernorm``, flattened ((B, registers * dim)); ``mlp_head.0`` projects that to
    ``out_dim`` when the caller wants it (the series embedding; the study ViT's head is used in training only).
    """

    def __init__(
        self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, registers: int, out_dim: int
    ) -> None:
        super().__init__()
        self.dim, self.registers = dim, registers
        self.cls_token = nn.Parameter(torch.randn(1, registers, dim))
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim)
        self.layernorm = nn.LayerNorm(dim)
        self.mlp_head = nn.Sequential(nn.Linear(registers * dim, out_dim))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L, dim) zero-padded sequences with (B,) lengths -> (B, registers * dim) pooled registers."""
        batch = x.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1).to(x.dtype), x], dim=1)
        mask = key_padding_mask(lengths + self.registers, x.shape[1])
        x = self.transformer(x, mask)
        return self.layernorm(x[:, : self.registers]).reshape(batch, -1)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(pooled)
