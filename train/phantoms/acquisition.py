"""Series protocols and the simulated acquisition: slice geometry, sampling, bias, noise, quantisation
(data.md §5, "Acquisition" and the series table).

Geometry is in DICOM's patient coordinates (LPS, mm). A series is a stack of parallel slices: the row
direction (along a row of pixels, i.e. increasing column index), the column direction (down the image) and
their cross product, the slice normal, along which the slices step by ``spacing_mm`` from slice 0. The anatomy
lives in RAS; a point converts by negating x and y.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from train.phantoms.anatomy import Anatomy
from train.phantoms.contrast import CONTRASTS, Contrast, signal_image
from train.phantoms.lesions import PlantedLesion
from train.phantoms.seeding import rng_for

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse

_BIAS_SD = 0.08
_AXIAL_TILT_DEG = (8.0, 3.0, 3.0)  # uniform ± about x, y, z: the operator aligns to AC-PC, roughly
_SLAB_CENTRE_LPS = (0.0, 17.0, 15.0)
_SLAB_CENTRE_JITTER_MM = 2.0  # patient positioning differs a little between studies
_TARGET_P99 = 1800.0  # the 99th percentile of tissue signal lands here, like a scanner's receiver scaling
_NOISE_SD = 25.0
_MAX_STORED = 4095  # BitsStored 12
_THICK_SLICE_MM = 2.0  # thicker slices average sub-planes (the slice profile)
_SUB_PLANES = (-0.33, 0.0, 0.33)  # × slice thickness
_ADC_STORAGE_SCALE = 1000.0  # 10⁻³ mm²/s -> stored as 10⁻⁶ mm²/s


@dataclass(frozen=True)
class SeriesProtocol:
    """What the scanner is told to acquire for one series, and the MR attributes its images carry."""

    description: str
    number: int
    matrix: int
    pixel_mm: float
    contrasts: tuple[str, ...]  # one image per slice per contrast (DWI: b0 and b1000)
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]  # PS3.3 defined terms only ("IR" is not one; the IR is in ScanningSequence)
    repetition_time_ms: float
    echo_time_ms: float
    inversion_time_ms: float | None
    echo_train_length: int
    flip_angle_deg: float
    sequence_names: tuple[str, ...]  # per contrast, as a scanner would name them
    # The recipe's 2D axial block: 24 slices of 5 mm with a 1 mm gap.
    plane: Literal["axial", "sagittal"] = "axial"
    slices: int = 24
    thickness_mm: float = 5.0
    gap_mm: float = 1.0
    acquisition_type: Literal["2D", "3D"] = "2D"
    derived: bool = False

    @property
    def spacing_mm(self) -> float:
        return self.thickness_mm + self.gap_mm


PROTOCOLS: dict[str, SeriesProtocol] = {
    p.description: p
    for p in (
        SeriesProtocol(
            "SAG T1 3D MPRAGE", 2, plane="sagittal", matrix=256, pixel_mm=1.0, slices=176,
            thickness_mm=1.0, gap_mm=0.0, acquisition_type="3D", contrasts=("T1",),
            scanning_sequence=("GR", "IR"), sequence_variant=("SK", "SP", "MP"), scan_options=(),
            repetition_time_ms=2300, echo_time_ms=2.3, inversion_time_ms=900,
            echo_train_length=1, flip_angle_deg=9, sequence_names=("*tfl3d1",),
        ),
        SeriesProtocol(
            "AX T2 TSE", 3, matrix=512, pixel_mm=0.45, contrasts=("T2",),
            scanning_sequence=("SE",), sequence_variant=("SK",), scan_options=(),
            repetition_time_ms=5000, echo_time_ms=100, inversion_time_ms=None,
            echo_train_length=16, flip_angle_deg=150, sequence_names=("*tse2d1_16",),
        ),
        SeriesProtocol(
            "AX T2 FLAIR", 4, matrix=256, pixel_mm=0.9, contrasts=("FLAIR",),
            scanning_sequence=("SE", "IR"), sequence_variant=("SK", "SP"), scan_options=(),
            repetition_time_ms=9000, echo_time_ms=120, inversion_time_ms=2500,
            echo_train_length=16, flip_angle_deg=150, sequence_names=("*tir2d1_16",),
        ),
        SeriesProtocol(
            "AX DWI", 5, matrix=128, pixel_mm=1.8, contrasts=("DWI_B0", "DWI_B1000"),
            scanning_sequence=("EP",), sequence_variant=("SK", "SS"), scan_options=("FS",),
            repetition_time_ms=5000, echo_time_ms=80, inversion_time_ms=None,
            echo_train_length=1, flip_angle_deg=90, sequence_names=("*ep_b0", "*ep_b1000t"),
        ),
        SeriesProtocol(
            "AX DWI ADC", 6, matrix=128, pixel_mm=1.8, contrasts=("ADC",),
            scanning_sequence=("EP",), sequence_variant=("SK", "SS"), scan_options=(),
            repetition_time_ms=5000, echo_time_ms=80, inversion_time_ms=None,
            echo_train_length=1, flip_angle_deg=90, sequence_names=("*ep_b0_1000",), derived=True,
        ),
    )
}
"""The full protocol (data.md §5 table), by SeriesDescription, in acquisition order."""

SERIES: tuple[str, ...] = tuple(PROTOCOLS)
FAST_SERIES: tuple[str, ...] = ("AX T2 FLAIR", "AX DWI", "AX DWI ADC")

# Fast mode samples a 2 mm anatomy; matrices finer than ~1 mm would only interpolate, so the two
# high-resolution series keep their field of view with half the matrix. FLAIR and DWI keep the clinical
# matrices.
_FAST_OVERRIDES: dict[str, dict[str, float | int]] = {
    "SAG T1 3D MPRAGE": {"matrix": 128, "pixel_mm": 2.0, "slices": 88, "thickness_mm": 2.0},
    "AX T2 TSE": {"matrix": 256, "pixel_mm": 0.9},
}


def protocol_for(description: str, fast: bool) -> SeriesProtocol:
    """The protocol of one series; ``fast`` applies the fast-mode matrices."""
    protocol = PROTOCOLS[description]
    if fast and description in _FAST_OVERRIDES:
        protocol = dataclasses.replace(protocol, **_FAST_OVERRIDES[description])  # type: ignore[arg-type]
    return protocol


@dataclass(frozen=True)
class Prescription:
    """Per-study placement shared by all series, as the technologist plans every series on one localiser."""

    axial_rotation: np.ndarray  # 3×3, LPS
    slab_centre_lps: np.ndarray


def prescribe(seed: int) -> Prescription:
    """Oblique axial tilt (uniform ±8° about x, ±3° about y and z) and slab centre for a study."""
    rng = rng_for("geometry", seed)
    ax, ay, az = np.deg2rad(rng.uniform(-1.0, 1.0, 3) * np.array(_AXIAL_TILT_DEG))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    jitter = np.clip(rng.normal(0.0, _SLAB_CENTRE_JITTER_MM, 3), -2.5 * _SLAB_CENTRE_JITTER_MM,
                     2.5 * _SLAB_CENTRE_JITTER_MM)
    return Prescription(rz @ ry @ rx, np.asarray(_SLAB_CENTRE_LPS) + jitter)


@dataclass(frozen=True, eq=False)
class SliceGeometry:
    """Where each pixel of a series lies, in LPS mm (DICOM Image Plane module, PS3.3 C.7.6.2)."""

    row_direction: np.ndarray
    column_direction: np.ndarray
    first_position: np.ndarray  # ImagePositionPatient of slice 0: centre of its top-left pixel
    rows: int
    columns: int
    slices: int
    pixel_mm: float
    spacing_mm: float
    thickness_mm: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    def position(self, index: int) -> np.ndarray:
        """ImagePositionPatient of slice ``index``."""
        return self.first_position + index * self.spacing_mm * self.normal


def plan_slices(protocol: SeriesProtocol, prescription: Prescription) -> SliceGeometry:
    """Slice stack of a series: axial series tilted by the study's rotation, the 3D sagittal one untilted."""
    if protocol.plane == "axial":
        rotation = prescription.axial_rotation
        row, column = rotation @ np.array([1.0, 0.0, 0.0]), rotation @ np.array([0.0, 1.0, 0.0])
    else:
        # Sagittal: rows run anterior -> posterior, columns head -> feet (the usual display).
        row, column = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
    normal = np.cross(row, column)
    half = (protocol.matrix - 1) / 2.0
    first = (
        prescription.slab_centre_lps
        - half * protocol.pixel_mm * (row + column)
        - (protocol.slices - 1) / 2.0 * protocol.spacing_mm * normal
    )
    return SliceGeometry(row, column, first, protocol.matrix, protocol.matrix, protocol.slices,
                         protocol.pixel_mm, protocol.spacing_mm, protocol.thickness_mm)


def _sample(image: np.ndarray, anatomy: Anatomy, geometry: SliceGeometry) -> np.ndarray:
    """Trilinear samples of an anatomy-grid image at every pixel, shape (slices, rows, columns).

    Slices thicker than 2 mm average three sub-planes across the slice, a cheap stand-in for the slice profile
    that blurs through-plane as real thick slices do.
    """
    # Output index (k, i, j) -> LPS = first + k·spacing·n + i·Δ·column + j·Δ·row -> RAS -> anatomy index.
    steps = np.column_stack((geometry.spacing_mm * geometry.normal,
                             geometry.pixel_mm * geometry.column_direction,
                             geometry.pixel_mm * geometry.row_direction))
    matrix = LPS_FROM_RAS @ steps / anatomy.voxel_mm
    shape = (geometry.slices, geometry.rows, geometry.columns)
    offsets = _SUB_PLANES if geometry.thickness_mm > _THICK_SLICE_MM else (0.0,)
    result = np.zeros(shape, dtype=np.float32)
    for fraction in offsets:
        origin_lps = geometry.first_position + fraction * geometry.thickness_mm * geometry.normal
        offset = anatomy.index_of(LPS_FROM_RAS @ origin_lps)
        result += ndimage.affine_transform(image, matrix, offset=offset, output_shape=shape, order=1,
                                           mode="constant", cval=0.0, output=np.float32)
    if len(offsets) > 1:
        result /= np.float32(len(offsets))
    return result


def _bias_field(anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Receive-coil shading 1 + aX + bY + cZ + dXZ over the grid scaled to [-1, 1]; a..d ~ N(0, 0.08)."""
    a, b, c, d = rng.normal(0.0, _BIAS_SD, 4)
    x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in anatomy.shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    return (1.0 + a * x + b * y + c * z + d * x * z).astype(np.float32)


def _quantise(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, _MAX_STORED).astype(np.uint16)


@dataclass(frozen=True, eq=False)
class ImageStack:
    """One contrast of a series: stored pixels (slices, rows, columns) and the display window for them."""

    contrast: Contrast
    pixels: np.ndarray
    window_centre: float
    window_width: float


def _stack(contrast: Contrast, pixels: np.ndarray) -> ImageStack:
    # One window per stack: the 99.5th percentile P, shown as centre P/2, width P. Per-slice percentiles would
    # make slices of one series look inconsistent, and cost far more.
    p995 = max(float(np.percentile(pixels, 99.5)), 1.0)
    return ImageStack(contrast, pixels, round(p995 / 2.0, 1), round(p995, 1))


def acquire(anatomy: Anatomy, lesion: PlantedLesion, protocol: SeriesProtocol, geometry: SliceGeometry,
            seed: int) -> list[ImageStack]:
    """Simulate one series of a study: one :class:`ImageStack` per contrast of the protocol.

    Magnitude images get the coil bias, a receiver scale putting the 99th percentile of tissue at 1800, Rician
    noise (σ 25) and 12-bit quantisation. Contrasts of one series (DWI b0 and b1000) share bias, scale and
    noise stream, so their ratio still encodes the ADC. The ADC map is derived, not acquired: the
    fraction-weighted ADC stored ×10⁶ mm²/s, with Gaussian noise (σ 25) inside the head and zero in air.
    """
    noise_rng = rng_for("noise", protocol.description, seed)
    stacks: list[ImageStack] = []
    if protocol.derived:
        for name in protocol.contrasts:
            contrast = CONTRASTS[name]
            adc = _sample(signal_image(anatomy, lesion, contrast), anatomy, geometry) * _ADC_STORAGE_SCALE
            tissue = adc > 0
            adc[tissue] += _NOISE_SD * noise_rng.standard_normal(int(tissue.sum()), dtype=np.float32)
            stacks.append(_stack(contrast, _quantise(adc)))
        return stacks

    bias = _bias_field(anatomy, rng_for("bias", protocol.description, seed))
    scale: float | None = None
    for name in protocol.contrasts:
        contrast = CONTRASTS[name]
        image = signal_image(anatomy, lesion, contrast)
        image *= bias
        sampled = _sample(image, anatomy, geometry)
        if scale is None:
            positive = sampled[sampled > 0]
            scale = _TARGET_P99 / max(float(np.percentile(positive, 99)), 1e-6) if positive.size else 1.0
        sampled *= np.float32(scale)
        real = sampled + _NOISE_SD * noise_rng.standard_normal(sampled.shape, dtype=np.float32)
        imaginary = _NOISE_SD * noise_rng.standard_normal(sampled.shape, dtype=np.float32)
        stacks.append(_stack(contrast, _quantise(np.hypot(real, imaginary))))
    return stacks
