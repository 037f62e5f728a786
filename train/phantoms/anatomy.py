"""Healthy head anatomy from the MNI152 2009c template that nilearn ships (data.md §5, "Tissue maps").

The template gives an average skull-stripped T1 and grey/white-matter probability maps on a 1 mm RAS grid.
From them we derive fraction maps for five healthy tissue classes (white matter, grey matter, CSF, skull,
scalp) that the signal equations in :mod:`train.phantoms.contrast` turn into images. Everything here depends
only on the voxel size, so it is computed once per process and cached; the arrays are made read-only because
every study in the process shares them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import cast

import nibabel
import numpy as np
from scipy import ndimage

BRAIN_CLASSES = ("wm", "gm", "csf")
"""Tissue classes inside the brain envelope; lesions replace fractions of these and nothing else."""
HEAD_CLASSES = (*BRAIN_CLASSES, "skull", "scalp")

_TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_ENVELOPE_T1_THRESHOLD = 0.2
_SKULL_MM = (1.0, 6.0)  # shell outside the brain envelope, by distance from it
_SCALP_MM = (6.0, 11.0)
_DEEP_CSF_FRACTION = 0.5  # "deep CSF" = the ventricles: mostly CSF and far from the brain surface
_DEEP_CSF_DEPTH_MM = 15.0
_MIDLINE_HALF_WIDTH_MM = 3.0
_VENTRICLE_OFF_MIDLINE = 0.8  # share of a component's voxels off the midline for it to count as ventricles


def template_directory() -> Path:
    """Folder holding nilearn's bundled MNI152 files, found without importing ``nilearn.datasets`` (slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("nilearn is not installed; the phantoms need the MNI152 template it bundles")
    return Path(spec.origin).parent / "datasets" / "data"


@lru_cache(maxsize=1)
def _templates_1mm() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The three template volumes scaled to 0..1, and the RAS coordinate of voxel (0, 0, 0)."""
    volumes: dict[str, np.ndarray] = {}
    origin = None
    for name in ("t1", "gm", "wm"):
        path = template_directory() / _TEMPLATE_FILE.format(name)
        if not path.is_file():
            raise FileNotFoundError(f"MNI152 template file missing: {path} (reinstall nilearn==0.14.1)")
        image = cast(nibabel.Nifti1Image, nibabel.load(path))
        affine = np.asarray(image.affine)
        # The sampler assumes an axis-aligned 1 mm RAS grid; fail loudly if a nilearn release changes that.
        if not np.allclose(affine[:3, :3], np.eye(3)):
            raise ValueError(f"{path}: expected a 1 mm RAS-aligned affine, found {affine[:3, :3].tolist()}")
        origin = affine[:3, 3].astype(np.float64)
        volumes[name] = np.asarray(image.dataobj, dtype=np.float32) / np.float32(255.0)
    assert origin is not None
    return volumes, origin


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping factor³ blocks (the fast-mode down-sampling; keeps partial volumes honest)."""
    if factor == 1:
        return volume
    nx, ny, nz = (size // factor * factor for size in volume.shape)
    blocks = volume[:nx, :ny, :nz].reshape(nx // factor, factor, ny // factor, factor, nz // factor, factor)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _shell(distance_mm: np.ndarray, inner: float, outer: float, voxel_mm: float) -> np.ndarray:
    """Fraction of each voxel lying between two distances, with a one-voxel linear ramp as partial volume."""
    def ramp(edge: float) -> np.ndarray:
        return np.clip((distance_mm - edge) / voxel_mm + 0.5, 0.0, 1.0)

    return (ramp(inner) - ramp(outer)).astype(np.float32)


def fraction_sum(fractions: Iterable[np.ndarray]) -> np.ndarray:
    """Voxel-wise sum of fraction maps of one shape, as a new float32 array."""
    arrays = list(fractions)
    total = np.zeros(arrays[0].shape, dtype=np.float32)
    for fraction in arrays:
        total += fraction
    return total


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Healthy tissue fractions on an axis-aligned RAS grid of cubic voxels.

    ``fractions[c][i, j, k]`` is the share of voxel (i, j, k) occupied by class ``c`` (``HEAD_CLASSES``); the
    fractions of a voxel sum to at most 1 (the rest is air). ``t1`` is the template's own T1 intensity (0..1),
    which the T1 series shows directly inside the brain. ``depth_mm`` is the distance from each voxel inside
    the brain envelope to the envelope's surface (0 outside); the subdural band and the ventricles are defined
    by it.
    """

    voxel_mm: float
    origin_ras: np.ndarray
    t1: np.ndarray
    fractions: dict[str, np.ndarray]
    envelope: np.ndarray
    depth_mm: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1.shape

    @property
    def voxel_ml(self) -> float:
        return self.voxel_mm**3 / 1000.0

    def axis_ras(self, axis: int) -> np.ndarray:
        """RAS coordinate (mm) of the voxel centres along one axis."""
        return self.origin_ras[axis] + self.voxel_mm * np.arange(self.shape[axis], dtype=np.float64)

    def index_of(self, ras_mm: np.ndarray) -> np.ndarray:
        """Continuous voxel index of RAS points (..., 3)."""
        return (np.asarray(ras_mm, dtype=np.float64) - self.origin_ras) / self.voxel_mm

    def ras_of(self, index: np.ndarray) -> np.ndarray:
        """RAS coordinate (mm) of voxel indices (..., 3)."""
        return self.origin_ras + self.voxel_mm * np.asarray(index, dtype=np.float64)

    @cached_property
    def lateral_ventricles(self) -> np.ndarray:
        """Mask of the lateral ventricles: the largest body of deep CSF (CSF > 0.5, > 15 mm inside the
        envelope) that lies off the midsagittal plane.

        The interhemispheric fissure and the basal cisterns are deep CSF too, because the envelope's closing
        bridges them, but they straddle the midline; growing them would not look like hydrocephalus.
        """
        deep = (self.fractions["csf"] > _DEEP_CSF_FRACTION) & (self.depth_mm > _DEEP_CSF_DEPTH_MM)
        labels, _ = ndimage.label(deep)
        x = self.axis_ras(0)
        best, best_size = 0, 0
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            members = np.nonzero(labels[box] == label)
            size = members[0].size
            off_midline = np.mean(np.abs(x[box[0]][members[0]]) > _MIDLINE_HALF_WIDTH_MM)
            if size > best_size and off_midline >= _VENTRICLE_OFF_MIDLINE:
                best, best_size = label, size
        if best == 0:
            raise RuntimeError("no lateral ventricles found in the MNI152 template; has it changed?")
        return _read_only(labels == best)

    @cached_property
    def ventricle_distance_mm(self) -> np.ndarray:
        """Distance to the nearest lateral-ventricle voxel; hydrocephalus dilates the ventricles along it."""
        distance = ndimage.distance_transform_edt(~self.lateral_ventricles, sampling=self.voxel_mm)
        return _read_only(distance.astype(np.float32))


@lru_cache(maxsize=2)
def load_anatomy(voxel_mm: int = 2) -> Anatomy:
    """Healthy anatomy at 1 mm (the template as shipped) or 2 mm (block-averaged, for fast mode).

    Follows data.md §5: envelope = fill_holes(closing(T1 > 0.2, 2 iterations)); CSF = clip(envelope - GM -
    WM); fractions rescaled where they exceed 1; skull 1-6 mm and scalp 6-11 mm outside the envelope.
    """
    if voxel_mm not in (1, 2):
        raise ValueError(f"voxel_mm must be 1 or 2, got {voxel_mm!r}")
    templates, origin_1mm = _templates_1mm()
    t1, gm, wm = (_block_mean(templates[name], voxel_mm) for name in ("t1", "gm", "wm"))
    # A block's centre lies half a (1 mm) voxel beyond its first voxel in each axis.
    origin = origin_1mm + (voxel_mm - 1) / 2.0

    envelope = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > _ENVELOPE_T1_THRESHOLD, iterations=2))
    csf = np.clip(envelope.astype(np.float32) - gm - wm, 0.0, 1.0)
    total = gm + wm + csf
    over = np.maximum(total, 1.0)
    gm, wm, csf = gm / over, wm / over, csf / over

    outside_mm = ndimage.distance_transform_edt(~envelope, sampling=float(voxel_mm)).astype(np.float32)
    depth_mm = ndimage.distance_transform_edt(envelope, sampling=float(voxel_mm)).astype(np.float32)
    skull = _shell(outside_mm, *_SKULL_MM, voxel_mm)
    scalp = _shell(outside_mm, *_SCALP_MM, voxel_mm)
    # Brain fractions outside the envelope are template noise; the skull must not overlap them.
    brain_outside = ~envelope
    for fraction in (gm, wm):
        fraction[brain_outside] = 0.0

    fractions = {"wm": wm, "gm": gm, "csf": csf, "skull": skull, "scalp": scalp}
    return Anatomy(
        voxel_mm=float(voxel_mm),
        origin_ras=_read_only(np.asarray(origin, dtype=np.float64)),
        t1=_read_only(np.ascontiguousarray(t1, dtype=np.float32)),
        fractions={name: _read_only(np.ascontiguousarray(f)) for name, f in fractions.items()},
        envelope=_read_only(envelope),
        depth_mm=_read_only(depth_mm),
    )
