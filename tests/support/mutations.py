"""Hypothesis strategies that mutate DICOM files the way broken senders and hostile peers do.

The seeds are the files in ``tests/fixtures/fuzz/corpus/`` (small valid objects) and a few of pydicom's own
test files. Mutations are byte-level (flips, inserted and deleted runs, truncation, "interesting" 16/32-bit
values written over length fields) and structure-aware (UID values swapped for path-traversal strings, element
values swapped between files), so they reach past the first parse error into the checks behind it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parents[1] / "fixtures" / "fuzz"
CORPUS = sorted((HERE / "corpus").glob("*.dcm"))
#: pydicom's own files that reach other code paths (JPEG 2000, JPEG-LS, big endian, multi-frame, SR).
PYDICOM_SEEDS = ("MR_small.dcm", "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm",
                 "emri_small.dcm", "test-SR.dcm")

HOSTILE_UIDS = [b"../../../../tmp/fuzz-escape", b"..", b"/etc/passwd", b"1.2/../../x", b"1.2.3\\..\\x",
                b"1." + b"9" * 70, b"", b"\x00" * 8, b"1.2.3\x00/..", b"~root"]
INTERESTING_LENGTHS = [0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]
_UID_VALUE = re.compile(rb"1\.2\.[0-9.]{4,62}")


def budget(name: str) -> settings:
    """The committed example budget for one property, scaled by TRIAGE_FUZZ_SCALE; derandomised unless
    TRIAGE_FUZZ_RANDOM=1, so the regular run is reproducible and a long run explores."""
    examples = json.loads((HERE / "budget.json").read_text())[name]
    scale = float(os.environ.get("TRIAGE_FUZZ_SCALE", "1"))
    # One store (one tmp folder) per property, filling up over the examples, like a receiver's: hence the
    # function-scoped fixture is intended.
    return settings(max_examples=max(1, int(examples * scale)), deadline=None, database=None,
                    derandomize=os.environ.get("TRIAGE_FUZZ_RANDOM") != "1", print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def seed_files() -> list[Path]:
    from pydicom.data import get_testdata_file

    return [*CORPUS, *(Path(get_testdata_file(name, download=False)) for name in PYDICOM_SEEDS)]


def _apply(data: bytearray, mutation: tuple) -> bytearray:
    kind, where, payload = mutation
    if not data:
        return bytearray(payload)
    position = int(where * (len(data) - 1))
    if kind == "flip":
        data[position] ^= (payload[0] if payload else 0xFF) or 1
    elif kind == "insert":
        data[position:position] = payload
    elif kind == "delete":
        del data[position:position + max(1, len(payload))]
    elif kind == "truncate":
        del data[position:]
    elif kind == "length16":
        value = INTERESTING_LENGTHS[payload[0] % len(INTERESTING_LENGTHS) if payload else 0] & 0xFFFF
        data[position:position + 2] = value.to_bytes(2, "little")
    elif kind == "length32":
        value = INTERESTING_LENGTHS[payload[0] % len(INTERESTING_LENGTHS) if payload else 0]
        data[position:position + 4] = value.to_bytes(4, "little")
    elif kind == "uid":
        matches = list(_UID_VALUE.finditer(data))
        if matches:
            match = matches[(payload[0] if payload else 0) % len(matches)]
            hostile = HOSTILE_UIDS[(payload[1] if len(payload) > 1 else 0) % len(HOSTILE_UIDS)]
            # Keep the element length as it was (pad or cut), or the rest of the file would no longer parse.
            width = match.end() - match.start()
            data[match.start():match.end()] = hostile[:width].ljust(width, b"\x00")
    return data


MUTATION = st.tuples(
    st.sampled_from(["flip", "flip", "insert", "delete", "truncate", "length16", "length32", "uid", "uid"]),
    st.floats(min_value=0, max_value=1, allow_nan=False),
    st.binary(min_size=0, max_size=16),
)


@st.composite
def mutated_file(draw, seeds: list[Path] | None = None) -> bytes:
    """A seed file's bytes with one to eight mutations applied."""
    seed = draw(st.sampled_from(seeds or seed_files()))
    data = bytearray(seed.read_bytes())
    for mutation in draw(st.lists(MUTATION, min_size=1, max_size=8)):
        data = _apply(data, mutation)
    return bytes(data)


@st.composite
def generated_file(draw) -> bytes:
    """Arbitrary bytes, half of them behind a valid preamble and file meta (so the dataset parser sees them)."""
    body = draw(st.binary(min_size=0, max_size=2048))
    if draw(st.booleans()):
        header = CORPUS[0].read_bytes()
        meta_end = header.index(b"\x08\x00", 132)  # the first element after group 0002
        return header[:meta_end] + body
    return body
