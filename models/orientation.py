"""Reorientation of a voxel array to LPS-aligned axes, as SimpleITK's ``DICOMOrient(image, "LPS")`` does.

ITK's "LPS" means index x grows toward patient Left, y toward Posterior, z toward Superior; a NumPy view of an
ITK image is indexed [z][y][x], so after reorientation array axis 0 runs inferior->superior, axis 1
anterior->posterior and axis 2 right->left: [S][P][L] (``reference/prima.md`` §1.4). Reorienting only permutes
and flips axes; voxel values are not interpolated, so oblique acquisitions keep their obliquity in the affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np


def array_axis_for_lps_component(component: int) -> int:
    """Array axis that follows LPS component ``component`` (0 = L, 1 = P, 2 = S) after reorientation."""
    return 2 - component


@dataclass(frozen=True)
class AxisMapping:
    """Where each native array axis goes: ``target_axis[j]`` and whether it is reversed (``flipped[j]``)."""

    target_axis: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]


def lps_axis_mapping(direction: np.ndarray) -> AxisMapping:
    """Assign each native axis (a column of ``direction``, unit vectors in LPS) to its nearest LPS axis.

    Per column the nearest patient axis is the largest absolute cosine; for strongly oblique data two columns
    can share it, so we take the one-to-one assignment with the largest total |cosine| (identical to the
    per-column choice whenever that is already one-to-one).
    """
    magnitude = np.abs(direction)
    best = max(permutations(range(3)), key=lambda p: sum(magnitude[p[j], j] for j in range(3)))
    target = tuple(array_axis_for_lps_component(best[j]) for j in range(3))
    flipped = tuple(bool(direction[best[j], j] < 0) for j in range(3))
    return AxisMapping(target_axis=target, flipped=flipped)  # type: ignore[arg-type]


def reorient_to_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, AxisMapping]:
    """Permute/flip ``array`` so its axes are [S][P][L]; returns the array, its affine and the mapping used.

    ``affine`` maps native array indices (homogeneous, column vector) to LPS millimetres.
    """
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    mapping = lps_axis_mapping(direction)

    # native index = index_map @ new index + offset, one native axis per target axis.
    index_map = np.zeros((4, 4))
    index_map[3, 3] = 1.0
    oriented = array
    for native_axis in range(3):
        target_axis = mapping.target_axis[native_axis]
        if mapping.flipped[native_axis]:
            index_map[native_axis, target_axis] = -1.0
            index_map[native_axis, 3] = array.shape[native_axis] - 1
            oriented = np.flip(oriented, axis=native_axis)
        else:
            index_map[native_axis, target_axis] = 1.0
    # np.transpose takes, for each new axis, the old axis that lands there.
    source_axis_for_target = [mapping.target_axis.index(t) for t in range(3)]
    oriented = np.ascontiguousarray(np.transpose(oriented, source_axis_for_target))
    return oriented, affine @ index_map, mapping
