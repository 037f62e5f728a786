"""Volume -> Prima patch tokens: 4 x 32 x 32 patches, background filter, VQ-VAE input, 289-d token features.

Behaviour of the reference (``reference/prima.md`` §1.5-1.8, §2), in our order:

1. the patch is 4 voxels along the thin (slice) axis and 32 along the two in-plane axes; each axis is zero-padded
   to a multiple of the patch, half before (rounded down) and the rest after;
2. a voxel is foreground when it is > 50 (> 0.5 when the padded volume's maximum is < 5), on raw values; a
   patch's foreground value is 100 x its foreground fraction, and patch t-bins hold values in [t, t+1);
3. "Outfill" bin t = patches of bin t; "Infill" bin t (t <= 20) = patches enclosed by bin t's patches
   (``binary_fill_holes`` of the bin's mask) that are not in the bin. Bins are dict entries keyed by ints, never
   by tensors (defect D3);
4. for percent = 5, 4, ..., 0: keep Outfill bins percent..100 and Infill bins percent..20, in bin order (a bin's
   infill after its outfill, raster order inside each); stop at the first percent that keeps more than 25
   tokens. The same patch may be kept twice, as in the reference;
5. patch values are divided by the padded volume's maximum, and the thin axis goes from 4 to 8 slices by
   repeating each slice (what MONAI ``Resize`` in "area" mode does for an exact doubling).

Unlike the reference, the background filter runs *before* the VQ-VAE: only the distinct kept patches are encoded
(about half of them; ``reference/performance.md`` §2), with identical results because each patch is encoded on
its own. Hole filling runs on the patch grid, not the voxel grid: the mask is a union of whole patches, so
6-connected voxel regions and 6-connected patch regions are the same thing (tested against the voxel version).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes

from models.positional import grid_encoding_3d
from models.volume import SeriesSkipped, SeriesVolume

#: Width of a token: VQ latent (2 x 2 x 8 x 8) + position (3 x 10) + thin-axis one-hot (3).
LATENT_FEATURES = 256
POSITION_FEATURES = 30
ORIENTATION_FEATURES = 3
TOKEN_FEATURES = LATENT_FEATURES + POSITION_FEATURES + ORIENTATION_FEATURES


@dataclass(frozen=True)
class TokenizerConfig:
    patch_thin: int = 4
    patch_in_plane: int = 32
    thin_repeat: int = 2  # 4 slices -> 8 for the VQ-VAE
    mask_threshold: float = 50.0  # on raw values; /100 when the volume's maximum is below low_range_max
    low_range_max: float = 5.0
    start_percent: int = 5
    min_tokens: int = 25  # a percent is accepted when it keeps MORE than this many tokens
    infill_max_bin: int = 20
    max_patches: int | None = 5000  # the reference skips larger series (> 312 axial slices)

    def patch_shape(self, thin_axis: int) -> tuple[int, int, int]:
        shape = [self.patch_in_plane] * 3
        shape[thin_axis] = self.patch_thin
        return tuple(shape)  # type: ignore[return-value]


@dataclass
class SeriesTokens:
    """The kept tokens of one series, before the VQ-VAE: what to encode and where each token came from."""

    series_instance_uid: str
    name: str
    thin_axis: int
    patch_shape: tuple[int, int, int]  # voxels per patch along each array axis (before the 4 -> 8 repeat)
    patches: np.ndarray  # (U, *patch_shape) float32, scaled to the volume maximum: the distinct kept patches
    token_patch: np.ndarray  # (K,) index into ``patches`` of each kept token (a patch may be kept twice)
    grid_index: np.ndarray  # (K, 3) patch-grid coordinates (array-axis order) of each token
    patch_origin: np.ndarray  # (K, 3) first voxel of each token's patch in the array (< 0 inside padding)
    foreground: np.ndarray  # (K,) foreground value (0-100) of each token
    percent: int  # the background percent that was accepted
    total_patches: int  # patches in the padded volume (what the reference would encode)
    volume_id: str = ""  # SeriesVolume.volume_id: the series UID, plus "#label" for a volume of a 4-D series

    @property
    def n_tokens(self) -> int:
        return len(self.token_patch)


def padding_before_and_after(shape: tuple[int, ...], patch: tuple[int, ...]) -> list[tuple[int, int]]:
    """Zero padding per axis so each axis is a multiple of its patch: half before (floor), the rest after."""
    pads = [(p - s % p) % p for s, p in zip(shape, patch)]
    return [(pad // 2, pad - pad // 2) for pad in pads]


def _patch_blocks(volume: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """View of a padded volume as (g0, g1, g2, p0, p1, p2): patch grid first, raster order."""
    g = [n // p for n, p in zip(volume.shape, patch)]
    return volume.reshape(g[0], patch[0], g[1], patch[1], g[2], patch[2]).transpose(0, 2, 4, 1, 3, 5)


def foreground_values(padded: np.ndarray, patch: tuple[int, int, int], config: TokenizerConfig) -> np.ndarray:
    """Per-patch foreground value (100 x fraction of voxels above the mask threshold) on the patch grid."""
    threshold = config.mask_threshold
    if padded.max() < config.low_range_max:  # volumes already scaled to 0..1
        threshold = threshold / 100
    counts = _patch_blocks(padded > threshold, patch).sum(axis=(3, 4, 5))
    # Same float64 arithmetic as np.mean(mask) * 100, so values on a bin edge land in the same bin.
    return counts / float(np.prod(patch)) * 100


def outfill_and_infill(
    bins: np.ndarray, config: TokenizerConfig
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Raster-ordered flat patch indices per bin: Outfill (bins 0..100) and Infill (bins 0..infill_max_bin)."""
    flat = bins.ravel()
    outfill = {t: np.flatnonzero(flat == t) for t in range(101)}
    infill = {}
    for t in range(config.infill_max_bin + 1):
        in_bin = bins == t
        enclosed = binary_fill_holes(in_bin) & ~in_bin if in_bin.any() else in_bin
        infill[t] = np.flatnonzero(enclosed.ravel())
    return outfill, infill


def select_tokens(bins: np.ndarray, config: TokenizerConfig) -> tuple[np.ndarray, int]:
    """Flat patch indices of the kept tokens in Prima's order, and the percent that was accepted."""
    outfill, infill = outfill_and_infill(bins, config)
    kept = np.zeros(0, dtype=np.int64)
    for percent in range(config.start_percent, -1, -1):
        parts = []
        for t in range(percent, 101):
            parts.append(outfill[t])
            if t <= config.infill_max_bin:
                parts.append(infill[t])
        kept = np.concatenate(parts)
        if len(kept) > config.min_tokens:
            break
    return kept, percent


def tokenize_volume(volume: SeriesVolume, config: TokenizerConfig = TokenizerConfig()) -> SeriesTokens:
    """Cut a volume into patches, filter background and keep what the VQ-VAE and the ViT need."""
    thin_axis = volume.thin_axis
    patch = config.patch_shape(thin_axis)
    pads = padding_before_and_after(volume.array.shape, patch)
    padded = np.pad(volume.array.astype(np.float32, copy=False), pads)
    grid_shape = tuple(n // p for n, p in zip(padded.shape, patch))
    total = int(np.prod(grid_shape))
    if config.max_patches is not None and total > config.max_patches:
        raise SeriesSkipped(
            f"{total} patches, more than the {config.max_patches} the model is run on",
            volume.series_instance_uid,
        )

    values = foreground_values(padded, patch, config)
    kept, percent = select_tokens(np.floor(values).astype(np.int64), config)
    distinct, token_patch = np.unique(kept, return_inverse=True)
    grid_index = np.stack(np.unravel_index(kept, grid_shape), axis=1)

    peak = padded.max()
    scaled = padded / peak if peak > 0 else padded  # float32 / float32, as the reference divides
    blocks = _patch_blocks(scaled, patch).reshape(total, *patch)
    return SeriesTokens(
        series_instance_uid=volume.series_instance_uid,
        name=volume.name,
        thin_axis=thin_axis,
        patch_shape=patch,
        patches=np.ascontiguousarray(blocks[distinct]),
        token_patch=token_patch.reshape(-1),
        grid_index=grid_index,
        patch_origin=grid_index * np.array(patch) - np.array([before for before, _ in pads]),
        foreground=values.ravel()[kept],
        percent=percent,
        total_patches=total,
        volume_id=volume.volume_id,
    )


def vqvae_input(patches: torch.Tensor, thin_axis: int, repeat: int = 2) -> torch.Tensor:
    """(U, *patch_shape) patches -> (U, 1, ...) VQ-VAE input with each thin-axis slice repeated ``repeat`` times."""
    return patches.repeat_interleave(repeat, dim=1 + thin_axis).unsqueeze(1)


def flatten_latents(latents: torch.Tensor, thin_axis: int) -> torch.Tensor:
    """(U, C, l0, l1, l2) VQ-VAE latents -> (U, C*l0*l1*l2) in Prima's order: channel, thin axis, then the rest.

    Thin axis 0: (c, a0, a1, a2); thin axis 1: (c, a1, a0, a2); thin axis 2: (c, a2, a1, a0)
    (``reference/prima.md`` §2: the reference swaps the thin axis to the front).
    """
    if thin_axis == 1:
        latents = latents.transpose(2, 3)
    elif thin_axis == 2:
        latents = latents.transpose(2, 4)
    return latents.flatten(start_dim=1)


def token_features(latents: torch.Tensor, tokens: SeriesTokens) -> torch.Tensor:
    """(U, C, ...) latents of ``tokens.patches`` -> (K, 289) tokens: [latent 256 | position 30 | orientation 3]."""
    device = latents.device
    flat = flatten_latents(latents.float(), tokens.thin_axis)
    token_patch = torch.as_tensor(tokens.token_patch, device=device, dtype=torch.long)
    position = grid_encoding_3d(torch.as_tensor(tokens.grid_index, device=device))
    orientation = torch.zeros(len(token_patch), ORIENTATION_FEATURES, device=device)
    orientation[:, tokens.thin_axis] = 1.0
    return torch.cat([flat[token_patch], position, orientation], dim=1)
