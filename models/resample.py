"""In-plane resampling of a slice stack to the 256 x 256 grid Prima was trained on.

The reference resamples with SimpleITK: a reference image of 256 x 256 pixels with the same origin and
direction and spacing ``old_size * old_spacing / 256``, linear interpolation, slice axis untouched
(``reference/prima.md`` §1.3). Output pixel ``i`` therefore samples the input at continuous index
``x = i * n_in / 256``. ITK treats a sample as inside the image when ``-0.5 <= x < n_in - 0.5`` and clamps the
upper neighbour to the last pixel; outside samples take the default value, which we set to 0 (the reference
passes the pixel-type enum by mistake, defect D4). Integer images stay integer in ITK: the interpolated value is
clamped to the type's range and truncated toward zero, which we reproduce so the background mask (a threshold
on raw values) sees the same numbers.
"""

from __future__ import annotations

import numpy as np

TARGET_IN_PLANE = 256


def linear_sample_plan(n_in: int, n_out: int = TARGET_IN_PLANE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower neighbour, upper neighbour and their weights (2, n_out) for each output sample along one axis.

    Samples outside the input get both weights 0, so they come out as 0.
    """
    x = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    inside = (x >= -0.5) & (x < n_in - 0.5)
    lower = np.clip(np.floor(x).astype(np.int64), 0, n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    upper_weight = x - np.floor(x)
    lower_weight = 1.0 - upper_weight
    lower_weight[~inside] = 0.0
    upper_weight[~inside] = 0.0
    return lower, upper, np.stack([lower_weight, upper_weight])


def _resample_axis(volume: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    lower, upper, (w_lower, w_upper) = linear_sample_plan(volume.shape[axis], n_out)
    shape = [1] * volume.ndim
    shape[axis] = n_out
    return np.take(volume, lower, axis=axis) * w_lower.reshape(shape) + np.take(
        volume, upper, axis=axis
    ) * w_upper.reshape(shape)


def resample_in_plane(
    stack: np.ndarray, size: int = TARGET_IN_PLANE, integer_dtype: np.dtype | None = None
) -> np.ndarray:
    """Resample a (slices, rows, columns) stack to (slices, size, size) with ITK's linear semantics.

    ``integer_dtype``: when the image is integer-valued in ITK's eyes (integer stored values and an integral
    rescale), the result is clamped to that type's range and truncated toward zero, as SimpleITK's cast does.
    Returns float32 in every case.
    """
    values = stack.astype(np.float64, copy=False)
    if values.shape[1] != size:
        values = _resample_axis(values, 1, size)
    if values.shape[2] != size:
        values = _resample_axis(values, 2, size)
    if integer_dtype is not None:
        info = np.iinfo(integer_dtype)
        values = np.trunc(np.clip(values, info.min, info.max))
    return values.astype(np.float32)
