"""Fuzzing the series loader (models.volume.load_series) with mutated files of one series.

Property: a series either becomes a volume or is skipped with SeriesSkipped (the loader's documented way of
saying "this series cannot be used, and here is why"); nothing else escapes, and the loader writes no file.
Corpus: the three slices of one series in tests/fixtures/fuzz/corpus (plus a multi-frame and an RLE seed); budget:
tests/fixtures/fuzz/budget.json.
"""
from __future__ import annotations

import shutil
import warnings

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from models.volume import SeriesSkipped, load_series
from tests.support.mutations import CORPUS, MUTATION, _apply, budget

SERIES = [p for p in CORPUS if p.name.startswith("mr_explicit_")]
OTHERS = [p for p in CORPUS if not p.name.startswith("mr_explicit_")]


@st.composite
def mutated_series(draw) -> list[bytes]:
    files = [bytearray(p.read_bytes()) for p in SERIES]
    if draw(st.booleans()):
        files.append(bytearray(draw(st.sampled_from(OTHERS)).read_bytes()))
    for index in draw(st.lists(st.integers(0, len(files) - 1), min_size=1, max_size=len(files))):
        for mutation in draw(st.lists(MUTATION, min_size=1, max_size=6)):
            files[index] = _apply(files[index], mutation)
    return [bytes(f) for f in files]


@budget("series_mutated")
@given(files=mutated_series())
def test_mutated_series_load_or_are_skipped_with_a_reason(tmp_path, files):
    folder = tmp_path / "series"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    paths = []
    for index, data in enumerate(files):
        path = folder / f"{index:03d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            volume = load_series(paths, in_plane_size=32)
        except SeriesSkipped as skipped:
            assert skipped.reason
        else:
            assert volume.array.ndim == 3 and np.isfinite(volume.affine_lps).all()
    assert sorted(folder.iterdir()) == paths
