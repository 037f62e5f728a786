"""Tokens mapped back to source-image pixel polygons (models.regions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.regions import token_regions
from models.tokenizer import tokenize_volume
from models.volume import load_series
from tests.support.mr_series import AXIAL, SAGITTAL, write_series


def bright(rows: int = 64, columns: int = 64):
    return lambda k: np.full((rows, columns), 500, np.int16)


def test_axial_token_covers_the_expected_pixels_of_its_four_source_slices(tmp_path: Path) -> None:
    paths, _, _ = write_series(tmp_path, orientation=AXIAL, n_slices=8, pixels=bright())
    volume = load_series(paths)
    tokens = tokenize_volume(volume)
    token = [tuple(g) for g in tokens.grid_index].index((1, 1, 2))  # slices 4-7, voxel rows 32-63, cols 64-95

    regions = token_regions(volume, tokens, token)

    assert [r.source.sop_instance_uid for r in regions] == [s.sop_instance_uid for s in volume.source[4:8]]
    for region in regions:
        columns, rows = zip(*region.polygon)
        assert region.polygon[0] == region.polygon[-1] and len(region.polygon) == 5
        # 4 voxels per native pixel; voxel edges 63.5 and 95.5 are native indices 15.875 and 23.875, +0.5 SCOORD.
        assert min(columns) == pytest.approx(16.375) and max(columns) == pytest.approx(24.375)
        assert min(rows) == pytest.approx(8.375) and max(rows) == pytest.approx(16.375)


def test_edge_token_polygons_stay_inside_their_images_and_skip_padding_slices(tmp_path: Path) -> None:
    paths, _, _ = write_series(tmp_path, orientation=SAGITTAL, n_slices=6, pixels=bright(48, 40))
    volume = load_series(paths)
    tokens = tokenize_volume(volume)  # 6 sagittal slices padded to 8: one padding slice on each side

    corner = [tuple(g) for g in tokens.grid_index].index(
        (0, 7, 0)
    )  # inferior (last rows), posterior (last columns)
    regions = token_regions(volume, tokens, corner)
    assert len(regions) == 3  # 4 slices minus 1 of padding
    for region in regions:
        points = np.array(region.polygon)
        assert points[:, 0].min() >= 0 and points[:, 0].max() == 40  # clipped to the 40 columns
        assert points[:, 1].min() >= 0 and points[:, 1].max() == 48  # and the 48 rows
