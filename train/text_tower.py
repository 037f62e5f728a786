"""The report text tower for CLIP training: a small word-level transformer trained on the report corpus.

It works offline: the vocabulary is built from the training reports themselves (lower-cased words, numbers
collapsed to one token), and the network is trained from scratch by the CLIP objective together with the image
side, so nothing is downloaded. Prima uses a pre-trained GPT-2 here; at inference neither is needed, since the
heads read the image embedding only.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from models.transformer import Transformer

PAD, UNKNOWN, END = "<pad>", "<unk>", "<end>"
_WORD = re.compile(r"[a-z]+|\d+(?:\.\d+)?")


def report_words(text: str) -> list[str]:
    return ["<num>" if w[0].isdigit() else w for w in _WORD.findall(text.lower())]


class ReportVocabulary:
    """Words seen at least ``min_count`` times in the corpus; the rest map to ``<unk>``."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = [PAD, UNKNOWN, END, *[w for w in words if w not in (PAD, UNKNOWN, END)]]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_corpus(cls, texts: Sequence[str], min_count: int = 1) -> ReportVocabulary:
        counts = Counter(w for t in texts for w in report_words(t))
        return cls(sorted(w for w, c in counts.items() if c >= min_count))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, texts: Sequence[str], max_words: int = 96) -> torch.Tensor:
        """(N, L) ids: words then ``<end>``, zero-padded; long reports keep their first ``max_words`` words."""
        rows = [[self.index.get(w, 1) for w in report_words(t)][:max_words] + [2] for t in texts]
        out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out


class ReportTextEncoder(nn.Module):
    """Word embedding + learned positions -> pre-norm transformer -> mean over the words -> projection."""

    def __init__(
        self, vocabulary_size: int, out_dim: int, dim: int = 64, depth: int = 2, heads: int = 2,
        max_words: int = 97,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary_size, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(1, max_words, dim) * 0.02)
        self.transformer = Transformer(dim, depth, heads, dim // heads, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.projection = nn.Linear(dim, out_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != 0
        x = self.embed(ids) + self.position[:, : ids.shape[1]]
        x = self.norm(self.transformer(x, mask))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.projection(pooled)
