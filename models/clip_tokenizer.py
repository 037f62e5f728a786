"""The CLIP byte-pair-encoding tokenizer of the MedImageInsight text tower.

MedImageInsight tokenizes prompts with the standard OpenAI CLIP BPE (49,408 tokens: 256 byte symbols, their
end-of-word forms, 48,894 merges, ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407), as the Hugging Face
slow ``CLIPTokenizer`` does it: ftfy repair, whitespace collapsed, lower case, the CLIP pre-tokenising
pattern, then BPE on the UTF-8 bytes of each piece. A sequence is ``BOS + at most 75 tokens + EOS`` padded
with EOS (the pad id is the EOS id) to 77 positions; the attention mask is 1 up to and including the first
EOS.

The vocabulary, the merge table (OpenAI's ``bpe_simple_vocab_16e6.txt.gz``) and the BPE itself are open_clip's
:class:`open_clip.tokenizer.SimpleTokenizer`, read from the installed package or a configured table. Two steps
stay here because open_clip's differ from the Hugging Face tokenizer the reference used: the text is not
HTML-unescaped (open_clip turns ``&amp;`` into ``&``), and the special tokens are spelled ``<|startoftext|>``
and ``<|endoftext|>`` in the text (open_clip spells them ``<start_of_text>``). Padding and the mask are the
text tower's, not open_clip's (which pads with 0). Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import regex
from open_clip.tokenizer import SimpleTokenizer, default_bpe

CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# The CLIP pre-tokeniser: the special tokens, English contractions, letter runs, single digits, other symbol runs.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class TokenizerError(RuntimeError):
    """The BPE table cannot be found or read."""


def packaged_bpe_path() -> Path:
    """OpenAI's CLIP BPE table inside the installed ``open_clip`` package."""
    path = Path(default_bpe())
    if not path.is_file():
        raise TokenizerError(f"{path}: open_clip_torch is installed without its CLIP BPE table")
    return path


def _clean(text: str) -> str:
    import ftfy

    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


class ClipTokenizer:
    """Text -> (input ids, attention mask) of fixed length, as the MedImageInsight text tower expects."""

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH) -> None:
        """``bpe_path``: a gzipped CLIP BPE table (default: the one open_clip ships)."""
        path = Path(bpe_path) if bpe_path else packaged_bpe_path()
        try:
            self._open_clip = SimpleTokenizer(str(path), context_length=context_length)
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{path}: cannot read the CLIP BPE table: {exc}") from exc
        self.encoder = self._open_clip.encoder
        self.bos_id, self.eos_id = self._open_clip.sot_token_id, self._open_clip.eot_token_id
        self.pad_id = self.eos_id
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` without BOS/EOS."""
        byte_encoder, ids = self._open_clip.byte_encoder, []
        for piece in _PATTERN.findall(_clean(text)):
            if piece in (BOS, EOS):
                ids.append(self.bos_id if piece == BOS else self.eos_id)
                continue
            mapped = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._open_clip.bpe(mapped).split(" "))
        return ids

    def __call__(self, texts: list[str] | str):
        """``(input_ids, attention_mask)`` as int64 tensors of shape (N, context_length)."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.context_length), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.bos_id] + self.encode(text)[: self.context_length - 2] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask
