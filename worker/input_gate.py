"""The input adequacy gate: whether a study gives a pipeline what its model needs, judged before the model runs.

A model asked about input it was not made for still answers, and answers with confidence: one ADC slice of a
normal brain can come back "subdural haemorrhage 100 %". So every run is first checked against its pipeline's
``input_gate`` configuration (documented in :mod:`worker.config`), from the image headers alone (no pixels are
decoded, so the check costs little):

* **modality**: only series of the pipeline's modalities count (neuro_mri: MR);
* **body part**: a series whose BodyPartExamined is set must match the pipeline's pattern (neuro_mri: brain or
  head); an empty value is accepted or not, as configured;
* **slices and coverage**: a series counts when it has at least ``min_slices`` distinct slice positions and covers
  at least ``min_coverage_mm`` along its slice normal (from ImagePositionPatient/ImageOrientationPatient, first to
  last slice centre plus one slice thickness);
* **required series**: each pattern must match the SeriesDescription of a series that counts. The patterns are
  the routing rule's ``expected_series`` (the same regular expressions, searched the same way as when completion
  waits for them), unless the gate configures its own.

A study that fails gets the outcome "not analysed" with every reason found, in words an operator can check
against the images (:class:`GateVerdict`); :mod:`worker.run_book` records it and writes the SR that says so.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

#: Keys of one pipeline's gate configuration (``input_gate.<pipeline>``).
POLICY_KEYS = ("modalities", "body_part_regex", "accept_missing_body_part", "required_series", "min_slices",
               "min_coverage_mm")


class GateConfigError(ValueError):
    """An ``input_gate`` configuration that cannot be used; the message names the key."""


@dataclass(frozen=True)
class SeriesInput:
    """What the gate knows of one image series, from its headers."""

    series_instance_uid: str
    description: str
    modality: str
    body_part: str
    slices: int
    coverage_mm: float

    @property
    def label(self) -> str:
        return f"series {self.description!r}" if self.description else f"series {self.series_instance_uid}"


@dataclass(frozen=True)
class GatePolicy:
    """One pipeline's requirements on its input (``input_gate.<pipeline>``)."""

    pipeline: str
    modalities: tuple[str, ...]
    body_part: re.Pattern[str] | None
    accept_missing_body_part: bool
    #: None: the routing rule's expected series are required.
    required_series: tuple[re.Pattern[str], ...] | None
    min_slices: int
    min_coverage_mm: float

    @classmethod
    def from_config(cls, pipeline: str, raw: Mapping[str, Any]) -> "GatePolicy":
        where = f"input_gate.{pipeline}"
        unknown = sorted(set(raw) - set(POLICY_KEYS))
        if unknown:
            raise GateConfigError(f"{where}: unknown keys {unknown}; known: {list(POLICY_KEYS)}")
        modalities = raw.get("modalities") or []
        if isinstance(modalities, str) or not all(isinstance(m, str) and m for m in modalities):
            raise GateConfigError(f"{where}.modalities: a list of Modality values (e.g. [MR]), not {modalities!r}")
        body_part = _compile(raw.get("body_part_regex") or None, f"{where}.body_part_regex")
        required_raw = raw.get("required_series")
        required = None
        if required_raw is not None:
            if isinstance(required_raw, str) or not isinstance(required_raw, Sequence):
                raise GateConfigError(f"{where}.required_series: a list of SeriesDescription patterns, or null for "
                                      f"the routing rule's expected_series; not {required_raw!r}")
            required = tuple(_compile(p, f"{where}.required_series") for p in required_raw)
        try:
            min_slices = int(raw.get("min_slices", 1))
            min_coverage = float(raw.get("min_coverage_mm", 0.0))
        except (TypeError, ValueError) as exc:
            raise GateConfigError(f"{where}: min_slices and min_coverage_mm must be numbers ({exc})") from None
        if min_slices < 1 or not math.isfinite(min_coverage) or min_coverage < 0:
            raise GateConfigError(f"{where}: min_slices must be >= 1 and min_coverage_mm >= 0, not {min_slices}, "
                                  f"{min_coverage}")
        return cls(pipeline, tuple(m.upper() for m in modalities), body_part,
                   bool(raw.get("accept_missing_body_part", True)), required, min_slices, min_coverage)


def _compile(pattern: Any, where: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(str(pattern))
    except re.error as exc:
        raise GateConfigError(f"{where}: pattern {pattern!r} does not compile: {exc}") from None


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision on one study: adequate, or not with every reason."""

    adequate: bool
    reasons: tuple[str, ...]
    #: Short names of the checks that failed (for the metric's label): modality, body_part, slices, coverage,
    #: required_series, no_series.
    checks: tuple[str, ...] = ()


def assess(series: Sequence[SeriesInput], policy: GatePolicy,
           rule_expected_series: Iterable[re.Pattern[str]] = ()) -> GateVerdict:
    """Judge a study's image series against ``policy``; ``rule_expected_series`` are the routing rule's."""
    reasons: list[str] = []
    checks: list[str] = []

    def refuse(check: str, reason: str) -> None:
        reasons.append(reason)
        if check not in checks:
            checks.append(check)

    if not series:
        refuse("no_series", "the study has no image series")
        return GateVerdict(False, tuple(reasons), tuple(checks))
    what = policy.pipeline
    of_modality = [s for s in series if not policy.modalities or s.modality.upper() in policy.modalities]
    if not of_modality:
        found = ", ".join(sorted({s.modality or "none" for s in series}))
        refuse("modality", f"no {'/'.join(policy.modalities)} series for {what} (modalities present: {found})")
    in_region: list[SeriesInput] = []
    wrong_region: list[SeriesInput] = []
    for s in of_modality:
        if not s.body_part:
            (in_region if policy.accept_missing_body_part else wrong_region).append(s)
        elif policy.body_part is None or policy.body_part.search(s.body_part):
            in_region.append(s)
        else:
            wrong_region.append(s)
    if of_modality and not in_region:
        parts = ", ".join(sorted({repr(s.body_part) if s.body_part else "empty" for s in wrong_region}))
        pattern = policy.body_part.pattern if policy.body_part else "any"
        refuse("body_part", f"body part examined {parts} is not one {what} analyses (/{pattern}/)")

    def shortfall(s: SeriesInput) -> str | None:
        short = []
        if s.slices < policy.min_slices:
            short.append(f"{s.slices} slice{'s' if s.slices != 1 else ''} (minimum {policy.min_slices})")
        if s.coverage_mm < policy.min_coverage_mm:
            short.append(f"{s.coverage_mm:.0f} mm coverage (minimum {policy.min_coverage_mm:g} mm)")
        return " and ".join(short) or None

    usable = [s for s in in_region if shortfall(s) is None]
    required = policy.required_series if policy.required_series is not None else tuple(rule_expected_series)
    for pattern in required:
        matching = [s for s in in_region if pattern.search(s.description)]
        if not matching:
            refuse("required_series", f"required series /{pattern.pattern}/ is missing (series present: "
                   + (", ".join(repr(s.description) for s in series) or "none") + ")")
        elif not any(s in usable for s in matching):
            best = max(matching, key=lambda s: (s.slices, s.coverage_mm))
            refuse(_shortfall_check(best, policy), f"required series /{pattern.pattern}/: {best.label} has "
                   f"{shortfall(best)}")
    if in_region and not usable and not any(r.startswith("required series") for r in reasons):
        best = max(in_region, key=lambda s: (s.slices, s.coverage_mm))
        refuse(_shortfall_check(best, policy), f"no series is adequate for {what}: the best, {best.label}, has "
               f"{shortfall(best)}")
    return GateVerdict(not reasons, tuple(reasons), tuple(checks))


def _shortfall_check(s: SeriesInput, policy: GatePolicy) -> str:
    return "slices" if s.slices < policy.min_slices else "coverage"


# -- facts from headers ------------------------------------------------------------------------------------------
def series_inputs(headers_by_series: Mapping[str, Sequence[pydicom.Dataset]]) -> list[SeriesInput]:
    """One :class:`SeriesInput` per series from its instances' headers (read with ``stop_before_pixels``)."""
    return [_series_input(uid, headers) for uid, headers in headers_by_series.items() if headers]


def read_headers(paths_by_series: Mapping[str, Sequence[Path]]) -> dict[str, list[pydicom.Dataset]]:
    """The headers of every file, by series; a file that cannot be read is left out (the loader reports it)."""
    out: dict[str, list[pydicom.Dataset]] = {}
    for uid, paths in paths_by_series.items():
        headers = []
        for path in paths:
            try:
                headers.append(pydicom.dcmread(path, stop_before_pixels=True))
            except Exception:  # noqa: BLE001 - unreadable files are the loader's to report, with their reason
                continue
        out[uid] = headers
    return out


def _series_input(uid: str, headers: Sequence[pydicom.Dataset]) -> SeriesInput:
    first = headers[0]
    positions: list[np.ndarray] = []
    normal: np.ndarray | None = None
    thickness = 0.0
    for ds in headers:
        frames = _frame_geometry(ds)
        for position, orientation, slice_thickness in frames:
            if orientation is not None and normal is None:
                normal = np.cross(orientation[:3], orientation[3:])
            if position is not None:
                positions.append(position)
            thickness = thickness or slice_thickness
    if normal is not None and positions and np.linalg.norm(normal) > 0:
        distances = sorted({round(float(np.dot(p, normal / np.linalg.norm(normal))), 2) for p in positions})
        slices = len(distances)
        coverage = (distances[-1] - distances[0]) + (thickness or _median_step(distances))
    else:
        # Projection images (CR, DX) and images without geometry: slices are frames, coverage is unknown.
        slices = sum(int(ds.get("NumberOfFrames") or 1) for ds in headers)
        coverage = 0.0
    return SeriesInput(uid, str(first.get("SeriesDescription") or "").strip(), str(first.get("Modality") or ""),
                       str(first.get("BodyPartExamined") or "").strip(), slices, float(coverage))


def _median_step(distances: Sequence[float]) -> float:
    return float(np.median(np.diff(distances))) if len(distances) > 1 else 0.0


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        array = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (n,) and np.all(np.isfinite(array)) else None


def _frame_geometry(ds: pydicom.Dataset) -> list[tuple[np.ndarray | None, np.ndarray | None, float]]:
    """(position, orientation, thickness) of each frame: the image's own, or an enhanced object's per frame."""
    thickness = _thickness(ds)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = (ds.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
        out = []
        for frame in ds.PerFrameFunctionalGroupsSequence:
            position = _nested(frame, "PlanePositionSequence", "ImagePositionPatient", 3)
            orientation = (_nested(frame, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
                           if "PlaneOrientationSequence" in frame
                           else _nested(shared, "PlaneOrientationSequence", "ImageOrientationPatient", 6))
            measures = frame.get("PixelMeasuresSequence") or shared.get("PixelMeasuresSequence") or []
            out.append((position, orientation, _thickness(measures[0]) if measures else thickness))
        return out
    return [(_floats(ds.get("ImagePositionPatient") or [], 3), _floats(ds.get("ImageOrientationPatient") or [], 6),
             thickness)]


def _nested(ds: pydicom.Dataset, sequence: str, keyword: str, n: int) -> np.ndarray | None:
    items = ds.get(sequence) or []
    return _floats(items[0].get(keyword) or [], n) if items else None


def _thickness(ds: pydicom.Dataset) -> float:
    try:
        value = float(ds.get("SliceThickness") or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0
