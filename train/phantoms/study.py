"""One synthetic brain-MRI study: plant a lesion, acquire the series, write them as DICOM."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from train.phantoms.acquisition import FAST_SERIES, SERIES, acquire, plan_slices, prescribe, protocol_for
from train.phantoms.anatomy import load_anatomy
from train.phantoms.dicom import study_identity, write_series
from train.phantoms.lesions import PhantomTruth, plant_lesion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhantomStudy:
    """A study written by :func:`write_phantom_study`.

    ``folder`` is ``out_dir/<StudyInstanceUID>``; ``files`` lists every file, series by series in acquisition
    order and by InstanceNumber within a series; ``series`` maps SeriesInstanceUID to SeriesDescription.
    """

    study_instance_uid: str
    folder: Path
    files: tuple[Path, ...]
    series: dict[str, str]
    truth: PhantomTruth


def _select_series(series: Sequence[str] | None, fast: bool) -> list[str]:
    if series is None:
        return list(FAST_SERIES if fast else SERIES)
    if isinstance(series, str):
        raise TypeError(f"series must be a sequence of SeriesDescriptions, not the string {series!r}")
    unknown = [name for name in series if name not in SERIES]
    if unknown:
        raise ValueError(f"unknown series {unknown}; expected SeriesDescriptions from {list(SERIES)}")
    if not series:
        raise ValueError(f"series is empty; pick from {list(SERIES)} or pass None for the default set")
    return [name for name in SERIES if name in series]  # acquisition order, duplicates dropped


def write_phantom_study(
    out_dir: Path,
    lesion: str = "tumour",
    seed: int = 0,
    *,
    fast: bool = True,
    series: Sequence[str] | None = None,
    patient_index: int | None = None,
    shuffle_names: bool = False,
) -> PhantomStudy:
    """Write a synthetic brain-MRI study with ``lesion`` planted, reproducibly from ``seed``.

    Files go to ``out_dir/<StudyInstanceUID>/<SeriesInstanceUID>/NNNN.dcm``. The same arguments always give
    the same UIDs and pixels. ``fast`` (default) simulates on the 2 mm template and writes FLAIR, DWI (b0 and
    b1000) and ADC; ``fast=False`` uses the 1 mm template and writes the full protocol (``SERIES``: 3D T1
    MPRAGE, T2 TSE, FLAIR, DWI, ADC). ``series`` picks series by SeriesDescription from ``SERIES`` in either
    mode; a series of a study is the same whichever others are written with it. ``patient_index`` is the
    synthetic patient's number (default: the seed); studies of one patient share name, ID, sex and birth date.
    ``shuffle_names`` scrambles file names so that their order says nothing about slice order.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    patient_number = seed if patient_index is None else patient_index
    if isinstance(patient_number, bool) or not isinstance(patient_number, int) or patient_number < 0:
        raise ValueError(f"patient_index must be a non-negative int, got {patient_index!r}")
    names = _select_series(series, fast)
    started = time.perf_counter()

    anatomy = load_anatomy(2 if fast else 1)
    planted = plant_lesion(anatomy, lesion, seed)
    identity = study_identity(lesion, seed, fast, patient_number)
    prescription = prescribe(seed)
    folder = Path(out_dir) / identity.study_uid

    files: list[Path] = []
    written: dict[str, str] = {}
    for name in names:
        protocol = protocol_for(name, fast)
        geometry = plan_slices(protocol, prescription)
        stacks = acquire(anatomy, planted, protocol, geometry, seed)
        uid, paths = write_series(folder, identity, protocol, geometry, stacks, shuffle_names)
        written[uid] = name
        files.extend(paths)

    log.info("phantom study %s (%s, seed %d, %s) written: %d files in %.2f s", identity.study_uid, lesion,
             seed, "fast" if fast else "full", len(files), time.perf_counter() - started)
    return PhantomStudy(identity.study_uid, folder, tuple(files), written, planted.truth)
