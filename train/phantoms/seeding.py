"""Deterministic random streams and UIDs derived from a study's seed.

Each concern (lesion jitter, acquisition geometry, noise per series, demographics...) draws from its own
stream, keyed by names, so that adding a series or a lesion never shifts the random numbers another part sees:
a normal and a tumour study with the same seed share patient, geometry and noise, and differ only by the
lesion.
"""

from __future__ import annotations

import uuid
import zlib

import numpy as np

# Name-based UUIDs (RFC 4122 v5) under a fixed namespace give reproducible UIDs in the 2.25 arc, which DICOM
# reserves for UIDs made from UUIDs (PS3.5 B.2); they are at most 44 characters, within the 64 allowed.
_UID_NAMESPACE = uuid.UUID("6f1e2a4c-3b7d-5e8f-9a0b-1c2d3e4f5a6b")


def _key(part: str | int) -> int:
    if isinstance(part, bool) or not isinstance(part, (str, int)):
        raise TypeError(f"random stream keys are str or int, got {part!r}")
    if isinstance(part, int):
        if part < 0:
            raise ValueError(f"random stream keys must be non-negative, got {part}")
        return part
    return zlib.crc32(part.encode("utf-8"))


def rng_for(*parts: str | int) -> np.random.Generator:
    """A generator seeded by the whole key, e.g. ``rng_for("noise", "AX T2 FLAIR", seed)``."""
    return np.random.default_rng(np.random.SeedSequence([_key(p) for p in parts]))


def uid_for(*parts: str | int) -> str:
    """A DICOM UID that depends only on the key; separators keep ("1", "23") and ("12", "3") apart."""
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"
