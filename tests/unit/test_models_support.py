"""The synthetic MR series that the models tests use (tests.support.mr_series) are what they say they are."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from tests.support.mr_series import SAGITTAL, write_series


def test_written_series_reads_back_with_the_geometry_asked_for(tmp_path: Path) -> None:
    paths, positions, images = write_series(tmp_path, n_slices=3, orientation=SAGITTAL)
    ds = pydicom.dcmread(paths[1])
    assert np.allclose([float(v) for v in ds.ImagePositionPatient], positions[1])
    assert np.array_equal(ds.pixel_array, images[1])
    assert paths[0].name != min(p.name for p in paths)  # names are not in position order
