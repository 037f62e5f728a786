"""Planted abnormalities and what was planted (data.md §5, "Lesions").

A lesion is described by how much of which healthy brain class it takes away from each voxel (``removed``) and
which tissue it puts in its place (``added``), both inside a bounding box of the anatomy grid. The two always
sum to the same amount per voxel, so the voxel stays full. Keeping the healthy images cached and adding only
this difference is what makes many studies per process cheap.

Positions follow the recipe (RAS mm) and sizes are given in millimetres, so a lesion has the same physical
size on the 1 mm and the 2 mm grid. Each seed jitters position and size a little and picks the hemisphere, so
a classifier trained on several seeds does not learn one fixed blob; the jitter is bounded so that the lesion
stays plainly visible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from train.phantoms.anatomy import BRAIN_CLASSES, Anatomy, fraction_sum
from train.phantoms.seeding import rng_for

LESIONS = ("normal", "subdural_haemorrhage", "tumour", "infarct", "hydrocephalus")

LESION_LABELS: dict[str, tuple[str, ...]] = {
    "normal": (),
    "subdural_haemorrhage": ("trauma_subdural_hematoma",),
    "tumour": ("tumor_adult_high_grade_glioma", "structural_edema"),
    "infarct": ("vascular_ischemic_large_vessel_stroke",),
    "hydrocephalus": ("ventricular_ventriculomegaly",),
}
"""Prima diagnosis labels each planted lesion implies; the models are trained on these."""

_EDGE_SIGMA_MM = 1.0  # recipe: "Gaussian σ 1" voxel at 1 mm, i.e. a soft 1 mm edge
_NORMAL_SMOOTHING_MM = 3.0
_CENTRE_JITTER_MM = 4.0  # s.d. of the per-axis position jitter, clipped at ±2 s.d.


@dataclass(frozen=True)
class PhantomTruth:
    """What was planted in a phantom study.

    ``side`` is "left" or "right" (the patient's) for a one-sided lesion, else None. ``centre_ras_mm`` is in
    RAS millimetres (negate x and y for DICOM's LPS): the centre of the tumour core; the innermost point of
    the infarct or of the subdural crescent; the centre of the enlarged ventricular system; None for a normal
    study. ``volume_ml`` is the lesion's volume: the tumour core (not its oedema), the infarct, the subdural
    blood, or for hydrocephalus the CSF added to the ventricles; 0 for a normal study.
    """

    lesion: str
    labels: tuple[str, ...]
    side: str | None
    centre_ras_mm: tuple[float, float, float] | None
    volume_ml: float


Box = tuple[slice, slice, slice]


@dataclass(frozen=True, eq=False)
class PlantedLesion:
    """A lesion as fraction changes inside ``box`` of the anatomy grid (see the module docstring)."""

    truth: PhantomTruth
    box: Box = (slice(0, 0), slice(0, 0), slice(0, 0))
    removed: dict[str, np.ndarray] = field(default_factory=dict)
    added: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class _Region:
    """The part of the anatomy grid a lesion may touch, with RAS coordinates of its voxel centres."""

    box: Box
    x: np.ndarray  # broadcastable (nx, 1, 1)
    y: np.ndarray  # (1, ny, 1)
    z: np.ndarray  # (1, 1, nz)


def _region_of(anatomy: Anatomy, low: np.ndarray, high: np.ndarray) -> _Region:
    """The region between voxel indices ``low`` (included) and ``high`` (excluded), clipped to the grid."""
    low = np.clip(low, 0, anatomy.shape)
    high = np.clip(high, 0, anatomy.shape)
    box: Box = (slice(int(low[0]), int(high[0])), slice(int(low[1]), int(high[1])),
                slice(int(low[2]), int(high[2])))
    x, y, z = (anatomy.axis_ras(axis)[box[axis]] for axis in range(3))
    return _Region(box, x[:, None, None], y[None, :, None], z[None, None, :])


def _region(anatomy: Anatomy, low_ras: np.ndarray, high_ras: np.ndarray) -> _Region:
    """The region covering a RAS box."""
    low = np.floor(anatomy.index_of(low_ras)).astype(int)
    high = np.ceil(anatomy.index_of(high_ras)).astype(int) + 1
    return _region_of(anatomy, low, high)


def _soften(mask: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Blur a hard mask into partial-volume fractions (the recipe's Gaussian edge)."""
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma=_EDGE_SIGMA_MM / voxel_mm)


def _ellipsoid_radius(region: _Region, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal radius: 1 on the ellipsoid's surface."""
    return np.sqrt(
        ((region.x - centre[0]) / radii[0]) ** 2
        + ((region.y - centre[1]) / radii[1]) ** 2
        + ((region.z - centre[2]) / radii[2]) ** 2
    )


def _jittered_centre(rng: np.random.Generator, centre: tuple[float, float, float]) -> np.ndarray:
    jitter = np.clip(rng.normal(0.0, _CENTRE_JITTER_MM, 3), -2 * _CENTRE_JITTER_MM, 2 * _CENTRE_JITTER_MM)
    return np.asarray(centre, dtype=np.float64) + jitter


def _side(rng: np.random.Generator) -> tuple[str, float]:
    """Hemisphere and the sign of RAS x in it (RAS +x points to the patient's right)."""
    return ("right", 1.0) if rng.random() < 0.5 else ("left", -1.0)


def _centroid(anatomy: Anatomy, region: _Region, weight: np.ndarray) -> np.ndarray:
    index = np.asarray(ndimage.center_of_mass(weight)) + [s.start for s in region.box]
    return anatomy.ras_of(index)


def _deepest_point(anatomy: Anatomy, region: _Region, weight: np.ndarray) -> np.ndarray:
    """The point of the lesion farthest from its border (nearest the centroid among ties), in RAS mm.

    A crescent's centroid lies outside the crescent, so truth reports this point instead: users sample the
    lesion there and find it, mid-thickness where it is thickest.
    """
    inside = weight > 0.5
    depth = ndimage.distance_transform_edt(inside)
    candidates = np.argwhere(depth >= depth.max() - 0.5) + [s.start for s in region.box]
    positions = anatomy.ras_of(candidates)
    centroid = _centroid(anatomy, region, weight)
    return positions[np.argmin(np.linalg.norm(positions - centroid, axis=1))]


def _truth(lesion: str, side: str | None, centre: np.ndarray | None, volume_ml: float) -> PhantomTruth:
    rounded: tuple[float, float, float] | None = None
    if centre is not None:
        rounded = (round(float(centre[0]), 2), round(float(centre[1]), 2), round(float(centre[2]), 2))
    return PhantomTruth(lesion, LESION_LABELS[lesion], side, rounded, round(float(volume_ml), 3))


def _brain_in(anatomy: Anatomy, region: _Region) -> dict[str, np.ndarray]:
    return {name: anatomy.fractions[name][region.box] for name in BRAIN_CLASSES}


def _plant_tumour(anatomy: Anatomy, rng: np.random.Generator) -> PlantedLesion:
    """Glioma: ellipsoidal core at (35, -20, 25) mm, radii (14, 12, 11) mm, inside a shell of vasogenic oedema
    out to 2.6 radii that follows the white matter (WM > 0.3), as oedema spreads along fibre tracts."""
    side, sign = _side(rng)
    centre = _jittered_centre(rng, (35.0, -20.0, 25.0))
    centre[0] = sign * abs(centre[0])
    radii = np.array([14.0, 12.0, 11.0]) * rng.uniform(0.85, 1.15) * rng.uniform(0.92, 1.08, 3)
    reach = 2.6 * radii + 3 * _EDGE_SIGMA_MM + anatomy.voxel_mm
    region = _region(anatomy, centre - reach, centre + reach)
    brain = _brain_in(anatomy, region)
    r = _ellipsoid_radius(region, centre, radii)

    core = np.clip(_soften(r <= 1.0, anatomy.voxel_mm), 0.0, 1.0)
    core_removed = {name: core * f for name, f in brain.items()}
    wm_left = brain["wm"] - core_removed["wm"]
    oedema = np.clip(_soften((r > 1.0) & (r <= 2.6) & (brain["wm"] > 0.3), anatomy.voxel_mm), 0.0, 1.0)
    oedema_removed = oedema * wm_left
    removed = dict(core_removed)
    removed["wm"] = core_removed["wm"] + oedema_removed
    added = {"tumour_core": fraction_sum(core_removed.values()), "oedema": oedema_removed}
    volume = float(added["tumour_core"].sum()) * anatomy.voxel_ml
    return PlantedLesion(_truth("tumour", side, centre, volume), region.box, removed, added)


def _plant_infarct(anatomy: Anatomy, rng: np.random.Generator) -> PlantedLesion:
    """Acute MCA-territory infarct: ellipsoid at (-40, -10, 20) mm, radii (10, 15, 12) mm, replacing grey and
    white matter where they make up more than 0.3 of the voxel (the CSF in sulci is not infarcted)."""
    side, sign = _side(rng)
    centre = _jittered_centre(rng, (-40.0, -10.0, 20.0))
    centre[0] = sign * abs(centre[0])
    radii = np.array([10.0, 15.0, 12.0]) * rng.uniform(0.85, 1.2) * rng.uniform(0.92, 1.08, 3)
    reach = radii + 3 * _EDGE_SIGMA_MM + anatomy.voxel_mm
    region = _region(anatomy, centre - reach, centre + reach)
    brain = _brain_in(anatomy, region)
    parenchyma = brain["gm"] + brain["wm"]
    extent = np.clip(_soften(_ellipsoid_radius(region, centre, radii) <= 1.0, anatomy.voxel_mm), 0.0, 1.0)
    extent = extent * (parenchyma > 0.3)
    removed = {"gm": extent * brain["gm"], "wm": extent * brain["wm"]}
    added = {"infarct": fraction_sum(removed.values())}
    # The ellipsoid's own centre may sit in a sulcus that was spared; report a point in infarcted tissue.
    truth_centre = _deepest_point(anatomy, region, added["infarct"])
    volume = float(added["infarct"].sum()) * anatomy.voxel_ml
    return PlantedLesion(_truth("infarct", side, truth_centre, volume), region.box, removed, added)


def _plant_subdural(anatomy: Anatomy, rng: np.random.Generator) -> PlantedLesion:
    """Subacute subdural haematoma: a crescent inside the envelope over one convexity (|x| > 20 mm), whose
    thickness is 8·cos(clip((z - 30)/60, ±1.5)) mm, thickest at the level of the lateral ventricles.

    Unlike the recipe, the band keeps to surface that faces sideways: along the floor of the middle cranial
    fossa a band of even 4 mm, cut by axial slices, showed as a large bright wedge no convexity haematoma
    makes.
    """
    side, sign = _side(rng)
    max_depth = 8.0 * rng.uniform(0.85, 1.25)
    z_peak = 30.0 + rng.uniform(-8.0, 8.0)
    medial_edge = 20.0 + rng.uniform(-3.0, 3.0)
    low = np.array([-1e3, -1e3, -1e3])
    high = np.array([1e3, 1e3, 1e3])
    if sign > 0:
        low[0] = medial_edge - anatomy.voxel_mm
    else:
        high[0] = -medial_edge + anatomy.voxel_mm
    region = _region(anatomy, low, high)
    brain = _brain_in(anatomy, region)
    depth = anatomy.depth_mm[region.box]
    thickness = max_depth * np.cos(np.clip((region.z - z_peak) / 60.0, -1.5, 1.5))
    # Linear ramps (one voxel wide) stand in for partial volume at the inner and the medial edge; the medial
    # taper over 12 mm keeps the crescent from ending in a flat cut.
    radial = np.clip((thickness - depth) / anatomy.voxel_mm + 0.5, 0.0, 1.0)
    lateral = np.clip((sign * region.x - medial_edge) / 12.0, 0.0, 1.0)
    # The depth gradient is the inward surface normal; its x component says how sideways the surface faces.
    # Smoothing first keeps the 2 mm grid's staircase out of the direction.
    smooth_depth = ndimage.gaussian_filter(depth, sigma=_NORMAL_SMOOTHING_MM / anatomy.voxel_mm)
    inward_x = np.gradient(smooth_depth, anatomy.voxel_mm, axis=0)
    facing = np.clip((-sign * inward_x - 0.35) / 0.35, 0.0, 1.0)
    extent = radial * lateral * facing * anatomy.envelope[region.box]
    removed = {name: extent * f for name, f in brain.items()}
    added = {"subdural_blood": fraction_sum(removed.values())}
    centre = _deepest_point(anatomy, region, added["subdural_blood"])
    volume = float(added["subdural_blood"].sum()) * anatomy.voxel_ml
    return PlantedLesion(_truth("subdural_haemorrhage", side, centre, volume), region.box, removed, added)


def _plant_hydrocephalus(anatomy: Anatomy, rng: np.random.Generator) -> PlantedLesion:
    """Hydrocephalus: the lateral ventricles grow by about 4 mm (3.6-5.4), the periventricular grey and white
    matter becoming CSF. The recipe grows all deep CSF; see :attr:`Anatomy.lateral_ventricles` for why not."""
    dilation_mm = 4.0 * rng.uniform(0.9, 1.35)
    distance = anatomy.ventricle_distance_mm
    grown = (distance <= dilation_mm + anatomy.voxel_mm) & anatomy.envelope
    index = np.argwhere(grown)
    region = _region_of(anatomy, index.min(axis=0), index.max(axis=0) + 1)
    box = region.box
    brain = _brain_in(anatomy, region)
    extent = np.clip((dilation_mm - distance[box]) / anatomy.voxel_mm + 0.5, 0.0, 1.0) * anatomy.envelope[box]
    removed = {"gm": extent * brain["gm"], "wm": extent * brain["wm"]}
    added = {"csf": fraction_sum(removed.values())}
    centre = _centroid(anatomy, region, added["csf"])
    volume = float(added["csf"].sum()) * anatomy.voxel_ml
    return PlantedLesion(_truth("hydrocephalus", None, centre, volume), box, removed, added)


_PLANTERS: dict[str, Callable[[Anatomy, np.random.Generator], PlantedLesion]] = {
    "tumour": _plant_tumour,
    "infarct": _plant_infarct,
    "subdural_haemorrhage": _plant_subdural,
    "hydrocephalus": _plant_hydrocephalus,
}


def plant_lesion(anatomy: Anatomy, lesion: str, seed: int) -> PlantedLesion:
    """The lesion ``lesion`` as it is planted for ``seed`` (deterministic)."""
    if lesion not in LESIONS:
        raise ValueError(f"unknown lesion {lesion!r}; expected one of {', '.join(LESIONS)}")
    if lesion == "normal":
        return PlantedLesion(_truth("normal", None, None, 0.0))
    return _PLANTERS[lesion](anatomy, rng_for("lesion", lesion, seed))
