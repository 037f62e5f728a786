"""The CLIP byte-pair-encoding tokenizer of the MedImageInsight text tower.

MedImageInsight tokenizes prompts with the standard OpenAI CLIP BPE (49,408 tokens: 256 byte symbols, their
end-of-word forms, 48,894 merges, ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407), as the Hugging Face
slow ``CLIPTokenizer`` does it: ftfy repair, whitespace collapsed, lower case, the CLIP pre-tokenising pattern,
then BPE on the UTF-8 bytes of each piece. A sequence is ``BOS + at most 75 tokens + EOS`` padded with EOS (the
pad id is the EOS id) to 77 positions; the attention mask is 1 up to and including the first EOS.

The merge table is OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, which the ``open_clip_torch`` package ships; it is
read from the installed package (without importing it) or from a configured path. Nothing is downloaded.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import regex

#: Number of merges CLIP uses from the table (the file holds more; the vocabulary is cut at 49,408).
CLIP_MERGES = 49152 - 256 - 2
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
    """OpenAI's CLIP BPE table inside the installed ``open_clip`` package (not imported: it pulls in torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the CLIP BPE table comes with the open_clip_torch package, which is not installed; "
                             "install it (pip install open_clip_torch) or configure the table's path")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise TokenizerError(f"{path}: open_clip_torch is installed without its CLIP BPE table")
    return path


@functools.lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """Each byte -> a printable unicode character, as GPT-2/CLIP BPE do (printable Latin-1 maps to itself)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def merge_symbols(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the adjacent pair of lowest rank until no ranked pair is left (the
    loop of OpenAI's CLIP and GPT-2 tokenizers alike)."""
    while len(word) > 1:
        best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def _clean(text: str) -> str:
    import ftfy

    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


class ClipTokenizer:
    """Text -> (input ids, attention mask) of fixed length, as the MedImageInsight text tower expects."""

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH,
                 max_merges: int = CLIP_MERGES) -> None:
        path = Path(bpe_path) if bpe_path else packaged_bpe_path()
        try:
            with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") \
                    as handle:
                lines = handle.read().split("\n")
        except OSError as exc:
            raise TokenizerError(f"{path}: cannot read the CLIP BPE table: {exc}") from exc
        # The first line is a version header; a merge is two symbols separated by one space.
        merges = [tuple(line.split()) for line in lines[1:max_merges + 1] if line.strip()]
        if any(len(m) != 2 for m in merges):
            raise TokenizerError(f"{path}: not a BPE merge table (a line without exactly two symbols)")
        base = list(byte_symbols().values())
        vocabulary = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
        self.encoder = {token: i for i, token in enumerate(vocabulary)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.bos_id, self.eos_id = self.encoder[BOS], self.encoder[EOS]
        self.pad_id = self.eos_id
        self.context_length = context_length
        self._cache: dict[str, list[str]] = {BOS: [BOS], EOS: [EOS]}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> list[str]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = merge_symbols(list(piece[:-1]) + [piece[-1] + "</w>"], self.ranks)
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` without BOS/EOS."""
        symbols = byte_symbols()
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            if piece in (BOS, EOS):
                ids.append(self.encoder[piece])
                continue
            mapped = "".join(symbols[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(mapped))
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
