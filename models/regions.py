"""Token -> the source images and pixel polygons it covers, for explanations that point at DICOM images.

A token is a patch of the reoriented, resampled volume. To show it on the images the radiologist has, each source
slice the patch crosses gets the patch's in-plane rectangle mapped through the volume's affine into that image's
pixel coordinates (SCOORD convention: (0, 0) is the top-left corner of the top-left pixel), clipped to the volume
(padding voxels have no source) and to the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.tokenizer import SeriesTokens
from models.volume import SeriesVolume, SliceSource


@dataclass(frozen=True)
class SourceRegion:
    source: SliceSource
    polygon: tuple[tuple[float, float], ...]  # (column, row) corners, closed (first point repeated last)


def token_regions(volume: SeriesVolume, tokens: SeriesTokens, token: int) -> list[SourceRegion]:
    """One polygon per source slice that token ``token`` of ``tokens`` covers, in array order."""
    origin = tokens.patch_origin[token]
    shape = np.asarray(tokens.patch_shape)
    size = np.asarray(volume.array.shape)
    thin = volume.thin_axis
    in_plane = [axis for axis in range(3) if axis != thin]
    low = np.maximum(origin, 0)
    high = np.minimum(origin + shape, size)  # exclusive
    if np.any(high <= low):
        return []  # the patch lies entirely in padding

    regions = []
    for along in range(low[thin], high[thin]):
        corners = []
        for first, second in ((0, 0), (1, 0), (1, 1), (0, 1)):
            index = np.empty(3)
            index[thin] = along
            a, b = in_plane
            # Voxel edges, half a voxel outside the first and last voxel centres.
            index[a] = (low[a] if first == 0 else high[a]) - 0.5
            index[b] = (low[b] if second == 0 else high[b]) - 0.5
            corners.append(index)
        source = volume.source[along]
        pixels = source.patient_to_pixel(volume.index_to_patient(np.array(corners)))
        # The rectangle's sides run along the image's rows and columns, so clipping each coordinate to the
        # image is exact; resampling makes the outermost voxel edges overhang the image by a fraction of a pixel.
        polygon = tuple(
            (float(np.clip(c, 0, source.columns)), float(np.clip(r, 0, source.rows))) for c, r, _ in pixels
        )
        regions.append(SourceRegion(source=source, polygon=(*polygon, polygon[0])))
    return regions
