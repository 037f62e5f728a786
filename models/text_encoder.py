"""Character-level encoder of short texts: the series name (innerViT input) and the study description.

Text -> ids (``reference/prima.md`` §2): lower-case; ``abcdefghijklmnopqrstuvwxyz_+-0123456789.*(),`` -> 1..44,
anything else (a space too) 45, an end token 46 appended, 0 pads. Model: ``embed`` Embedding(47, dim - 10)
concatenated with a fixed 10-channel sinusoidal position code, a pre-norm transformer, and the end token's
output state as the text's vector (``linear`` maps it to the output width).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.positional import CHANNELS_PER_AXIS, sinusoid_encoding
from models.transformer import Transformer

CHARACTERS = "abcdefghijklmnopqrstuvwxyz_+-0123456789.*(),"
PAD_ID, UNKNOWN_ID, END_ID = 0, 45, 46
VOCABULARY_SIZE = 47
_CHARACTER_IDS = {c: i + 1 for i, c in enumerate(CHARACTERS)}


def text_to_ids(text: str) -> list[int]:
    return [_CHARACTER_IDS.get(c, UNKNOWN_ID) for c in text.lower()] + [END_ID]


def texts_to_tensor(texts: Sequence[str]) -> torch.Tensor:
    """(N, longest + 1) long tensor of ids, zero-padded after each text's end token."""
    ids = [text_to_ids(t) for t in texts]
    out = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for row, text_ids in enumerate(ids):
        out[row, : len(text_ids)] = torch.tensor(text_ids)
    return out


class CharacterTransformerEncoder(nn.Module):
    """Keys ``embed``, ``transformer.layers.*``, ``linear`` (Prima's SerieTransformerEncoder layout)."""

    def __init__(
        self,
        out_dim: int,
        dim: int = 256,
        depth: int = 3,
        heads: int = 4,
        dim_head: int = 64,
        mlp_dim: int = 300,
        position_channels: int = CHANNELS_PER_AXIS,
    ) -> None:
        super().__init__()
        self.dim, self.position_channels = dim, position_channels
        self.embed = nn.Embedding(VOCABULARY_SIZE, dim - position_channels)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim)
        self.linear = nn.Linear(dim, out_dim)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) ids with one end token per row -> (N, dim) state at the end token (before ``linear``)."""
        is_end = ids == END_ID
        if not bool(is_end.any(dim=1).all()):
            raise ValueError("every text must carry an end token (id 46); build ids with texts_to_tensor")
        end = is_end.int().argmax(dim=1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        position_code = sinusoid_encoding(positions, self.position_channels).to(self.embed.weight.dtype)
        x = torch.cat([self.embed(ids), position_code.expand(ids.shape[0], -1, -1)], dim=2)
        x = self.transformer(x, positions[None, :] <= end[:, None])
        return x[torch.arange(ids.shape[0], device=ids.device), end]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(self.encode(ids))


class PretrainedNameEncoder(nn.Sequential):
    """Series-name encoder variant A: a separately pre-trained text encoder read before its own ``linear``,
    then ``Linear(dim, token width)``. Keys ``0.*`` (``0.linear`` is carried but unused) and ``1.*``."""

    def __init__(self, text_encoder: CharacterTransformerEncoder, out_dim: int) -> None:
        super().__init__(text_encoder, nn.Linear(text_encoder.dim, out_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self[1](self[0].encode(ids))
