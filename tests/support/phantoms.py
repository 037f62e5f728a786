"""Phantom studies that several test modules read."""
from __future__ import annotations

import pytest

from train.phantoms import SERIES, PhantomStudy, write_phantom_study


@pytest.fixture(scope="module")
def all_series_study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    """A study with every series the phantom writer knows (a tumour, seed 5)."""
    return write_phantom_study(tmp_path_factory.mktemp("phantoms") / "all", "tumour", 5, series=SERIES)
