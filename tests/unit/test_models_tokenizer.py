"""Volume -> tokens: padding, background filter, infill, VQ-VAE input, token features (models.tokenizer)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_fill_holes

from models.positional import grid_encoding_3d, sinusoid_encoding
from models.tokenizer import (
    TOKEN_FEATURES,
    TokenizerConfig,
    flatten_latents,
    outfill_and_infill,
    select_tokens,
    token_features,
    tokenize_volume,
    vqvae_input,
)
from models.volume import SeriesSkipped, SeriesVolume


def volume_of(array: np.ndarray, thin_axis: int = 0) -> SeriesVolume:
    return SeriesVolume("1.2.3", "T1", array.astype(np.float32), np.eye(4), thin_axis, source=[])


def patch_values(grid: np.ndarray, patch=(4, 32, 32)) -> np.ndarray:
    """A volume whose patch (i, j, k) is filled with grid[i, j, k] foreground percent (first voxels bright)."""
    volume = np.zeros(tuple(g * p for g, p in zip(grid.shape, patch)), np.float32)
    voxels = int(np.prod(patch))
    for index in np.ndindex(grid.shape):
        block = np.zeros(voxels, np.float32)
        block[: round(grid[index] / 100 * voxels)] = 200.0
        sl = tuple(slice(i * p, (i + 1) * p) for i, p in zip(index, patch))
        volume[sl] = block.reshape(patch)
    return volume


def test_padding_splits_the_remainder_and_padding_voxels_count_as_background() -> None:
    # 6 slices -> 8: one zero slice on each side.
    tokens = tokenize_volume(volume_of(np.full((6, 256, 256), 100.0)))

    assert tokens.total_patches == 2 * 8 * 8 and tokens.n_tokens == 128
    assert np.allclose(tokens.foreground, 75.0)  # 3 of 4 slices are foreground in every patch
    assert sorted(set(tokens.patch_origin[:, 0])) == [-1, 3]
    first, second = tokens.patches[tokens.token_patch[0]], tokens.patches[tokens.token_patch[-1]]
    assert np.all(first[0] == 0) and np.all(first[1:] == 1.0)  # padded slice 0, then scaled values
    assert np.all(second[-1] == 0) and np.all(second[:-1] == 1.0)


def test_background_patches_are_not_tokens() -> None:
    grid = np.zeros((3, 8, 8))
    grid[:, 2:6, 2:6] = 100  # a 3 x 4 x 4 block of brain among air
    grid[0, 0, 0] = 4  # a speck below the 5 % start
    tokens = tokenize_volume(volume_of(patch_values(grid)))

    assert tokens.percent == 5 and tokens.n_tokens == 48
    assert {tuple(g) for g in tokens.grid_index} == {tuple(i) for i in np.argwhere(grid == 100)}
    assert len(tokens.patches) == 48  # only kept patches go to the VQ-VAE


def test_patches_enclosed_by_a_low_bin_are_kept_after_that_bin_and_may_be_kept_twice() -> None:
    grid = np.zeros((3, 5, 5))
    grid[:, 1:4, 1:4] = 10  # a 3 x 3 wall of 10 % patches in every slab...
    grid[1, 2, 2] = 3  # ...around a 3 % patch (enclosed: in the middle slab, walled above and below)
    grid[0, 0, 0] = 60
    grid[1, 0, 4] = 60
    grid = np.pad(grid, ((0, 0), (0, 3), (0, 3)))  # to the 8 x 8 in-plane grid of 256 x 256
    tokens = tokenize_volume(volume_of(patch_values(grid)))

    order = [tuple(g) for g in tokens.grid_index]
    n_wall = int((grid == 10).sum())
    # Bin 10 outfill (raster), then bin 10 infill (the enclosed 3 % patch), then bin 60.
    assert order[:n_wall] == sorted(tuple(i) for i in np.argwhere(grid == 10))
    assert order[n_wall] == (1, 2, 2)
    assert order[n_wall + 1 :] == [(0, 0, 0), (1, 0, 4)]

    grid[1, 2, 2] = 60  # now it is also in outfill bin 60: kept twice, encoded once
    tokens = tokenize_volume(volume_of(patch_values(grid)))
    assert [tuple(g) for g in tokens.grid_index].count((1, 2, 2)) == 2
    assert len(tokens.patches) == tokens.n_tokens - 1


def test_percent_drops_until_more_than_25_tokens_are_kept() -> None:
    bins = np.zeros((4, 8, 8), np.int64)
    bins[0, 0, :8] = 100
    bins[1, :, :4] = 2  # 32 patches at 2 %
    kept, percent = select_tokens(bins, TokenizerConfig())
    assert percent == 2 and len(kept) == 8 + 32

    kept, percent = select_tokens(np.zeros((2, 8, 8), np.int64), TokenizerConfig())
    assert percent == 0 and len(kept) == 128  # all background: percent 0 keeps everything, as the reference


def test_infill_on_the_patch_grid_equals_voxel_hole_filling() -> None:
    rng = np.random.default_rng(0)
    patch = (2, 3, 3)  # small patches keep the voxel version fast; the argument does not depend on size
    for _ in range(20):
        bins = rng.choice([0, 7, 20], size=(5, 6, 6), p=[0.3, 0.5, 0.2])
        _, infill = outfill_and_infill(bins, TokenizerConfig())
        for t in (7, 20):
            voxels = np.kron(bins == t, np.ones(patch, bool))  # the reference's voxel mask
            filled = binary_fill_holes(voxels)
            full = filled.reshape(5, 2, 6, 3, 6, 3).all(axis=(1, 3, 5))
            expected = np.flatnonzero((full & (bins != t)).ravel())
            assert np.array_equal(infill[t], expected)


def test_low_range_volumes_use_the_scaled_threshold() -> None:
    array = np.zeros((4, 256, 256), np.float32)
    array[:, :32, :32] = 0.6  # above 0.5: foreground because the maximum is below 5
    array[:, :32, 32:64] = 0.4
    tokens = tokenize_volume(volume_of(array))
    assert tokens.percent == 0  # only one foreground patch: falls through to percent 0
    assert tokens.foreground[list(map(tuple, tokens.grid_index)).index((0, 0, 0))] == 100.0


def test_coronal_256_slice_volume_tokenizes_along_its_slice_axis() -> None:
    array = np.zeros((256, 256, 256), np.float32)
    array[64:192, :, 64:192] = 300.0
    tokens = tokenize_volume(volume_of(array, thin_axis=1))
    assert tokens.patch_shape == (32, 4, 32)
    assert tokens.total_patches == 8 * 64 * 8
    assert tokens.n_tokens == 4 * 64 * 4


def test_oversized_series_is_skipped_like_the_reference() -> None:
    with pytest.raises(SeriesSkipped, match="more than the 5000"):
        tokenize_volume(volume_of(np.zeros((320, 256, 256), np.float32)))


@pytest.mark.parametrize("thin_axis", [0, 1, 2])
def test_vqvae_input_repeats_each_thin_slice_twice(thin_axis: int) -> None:
    shape = [32, 32, 32]
    shape[thin_axis] = 4
    patches = torch.rand(3, *shape)
    doubled = vqvae_input(patches, thin_axis)

    expected_shape = [3, 1, 32, 32, 32]
    expected_shape[2 + thin_axis] = 8
    assert list(doubled.shape) == expected_shape
    for i in range(8):
        assert torch.equal(doubled[:, 0].select(1 + thin_axis, i), patches.select(1 + thin_axis, i // 2))


def test_position_features_match_the_sinusoid_formula() -> None:
    grid = torch.tensor([[0, 0, 0], [3, 7, 1], [99, 5, 63]])
    features = grid_encoding_3d(grid)
    assert features.shape == (3, 30) and features.dtype == torch.float32
    for n, g in enumerate(grid.tolist()):
        for axis in range(3):
            for k in range(5):
                angle = g[axis] * 10000 ** (-2 * k / 10)
                assert features[n, 10 * axis + 2 * k].item() == pytest.approx(math.sin(angle), abs=2e-5)
                assert features[n, 10 * axis + 2 * k + 1].item() == pytest.approx(math.cos(angle), abs=2e-5)
    assert torch.equal(sinusoid_encoding(torch.arange(4))[0], torch.tensor([0.0, 1.0] * 5))


@pytest.mark.parametrize("thin_axis", [0, 1, 2])
def test_latents_flatten_channel_then_thin_axis_first(thin_axis: int) -> None:
    shape = [8, 8, 8]
    shape[thin_axis] = 2
    latents = torch.arange(2 * 2 * 8 * 8, dtype=torch.float32).reshape(1, 2, *shape)
    flat = flatten_latents(latents, thin_axis)[0]

    axes_order = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 1, 0)}[thin_axis]
    expected = []
    for c in range(2):
        for i in range(shape[axes_order[0]]):
            for j in range(shape[axes_order[1]]):
                for k in range(shape[axes_order[2]]):
                    index = [0, 0, 0]
                    index[axes_order[0]], index[axes_order[1]], index[axes_order[2]] = i, j, k
                    expected.append(latents[0, c, index[0], index[1], index[2]].item())
    assert flat.tolist() == expected


def test_token_features_are_latent_position_and_orientation() -> None:
    array = np.zeros((256, 256, 12), np.float32)
    array[:, :, :] = 80.0
    tokens = tokenize_volume(volume_of(array, thin_axis=2))
    latents = torch.randn(len(tokens.patches), 2, 8, 8, 2)
    features = token_features(latents, tokens)

    assert features.shape == (tokens.n_tokens, TOKEN_FEATURES) == (8 * 8 * 3, 289)
    assert torch.equal(features[:, 256:286], grid_encoding_3d(torch.as_tensor(tokens.grid_index)))
    assert torch.equal(features[:, 286:], torch.tensor([[0.0, 0.0, 1.0]]).expand(tokens.n_tokens, 3))
    assert torch.equal(features[5, :256], flatten_latents(latents, 2)[tokens.token_patch[5]])
