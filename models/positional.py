"""Fixed sinusoidal position features, computed from the position itself instead of a lookup table.

Prima uses the ``positional-encodings`` package (6.0.3): for ``c`` channels per axis it takes ``c/2``
frequencies ``f_k = 1 / 10000**(2k/c)`` and writes ``sin(p f_k)``, ``cos(p f_k)`` interleaved (channel 2k is the
sine, 2k+1 the cosine). The 3-D version concatenates one such block per axis (axis 0 first). The reference
materialises a 100^3 x 30 table (120 MB) and indexes it; evaluating the formula gives the same float32 values for
the few hundred positions a series needs, and has no upper limit on the grid.
"""

from __future__ import annotations

import torch

#: Channels per axis of Prima's 3-D patch position features (30 in all) and of the name encoder's 1-D ones.
CHANNELS_PER_AXIS = 10


def sinusoid_frequencies(channels: int = CHANNELS_PER_AXIS) -> torch.Tensor:
    """The ``channels // 2`` float32 frequencies, computed the way the package computes them."""
    return 1.0 / (10000 ** (torch.arange(0, channels, 2).float() / channels))


def sinusoid_encoding(positions: torch.Tensor, channels: int = CHANNELS_PER_AXIS) -> torch.Tensor:
    """(N,) positions -> (N, channels) float32: sin/cos of each frequency, interleaved."""
    angles = (
        positions.to(torch.float32)[:, None] * sinusoid_frequencies(channels).to(positions.device)[None, :]
    )
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def grid_encoding_3d(grid_index: torch.Tensor, channels_per_axis: int = CHANNELS_PER_AXIS) -> torch.Tensor:
    """(N, 3) integer grid coordinates -> (N, 3 * channels_per_axis): axis 0's block, then axis 1's, axis 2's."""
    return torch.cat([sinusoid_encoding(grid_index[:, axis], channels_per_axis) for axis in range(3)], dim=1)
