"""Phantom studies as a training corpus: written once, tokenised once, cached as compact arrays.

Each study is written as DICOM by :mod:`train.phantoms` (fast mode), loaded and tokenised exactly as the worker
does it (:func:`models.volume.load_study`, :func:`models.tokenizer.tokenize_volume`), and its kept patches are
saved (float16, compressed) with the token layout and a synthetic report; the DICOM files are then deleted. The
cache is keyed by (lesion, seed), so a corpus grows without redoing what is there. Studies are written in
parallel processes (one per CPU core).

The cache lives in a folder named after a digest of the code that makes its content (the phantom generator,
the series loader, the tokenizer): when that code changes, the corpus is made again rather than silently mixing
old and new tokens.

The synthetic reports are written from what was planted (side and size), in a few phrasings, so that the text
tower of the CLIP objective sees varied text that names the finding.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from models.labels import DIAGNOSIS_NAMES
from train.progress import monitor

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass
class CachedSeries:
    name: str
    thin_axis: int
    patches: np.ndarray  # (U, *patch_shape) float16, scaled to the series maximum
    token_patch: np.ndarray  # (K,) index into patches
    grid_index: np.ndarray  # (K, 3)


@dataclass
class CachedStudy:
    key: str  # "<lesion>-<seed>"
    study_instance_uid: str
    lesion: str
    seed: int
    labels: tuple[str, ...]
    report: str
    series: list[CachedSeries]

    def label_vector(self, names: Sequence[str] = DIAGNOSIS_NAMES) -> np.ndarray:
        return np.array([1.0 if n in self.labels else 0.0 for n in names], dtype=np.float32)


# --- synthetic reports ----------------------------------------------------------------------------------------

_FINDINGS: dict[str, tuple[str, ...]] = {
    "normal": (
        "The brain parenchyma is normal in signal. Ventricles and sulci are of normal size.",
        "Normal appearances of the brain. No focal abnormality.",
        "Unremarkable MRI of the brain for age.",
    ),
    "subdural_haemorrhage": (
        "There is a {side} convexity subdural haematoma measuring up to {size} mm in thickness.",
        "Crescentic {side} subdural collection of blood products, {size} mm thick, in keeping with subdural haematoma.",
        "{Side} sided subdural hematoma over the cerebral convexity.",
    ),
    "tumour": (
        "There is a {side} hemispheric intra-axial mass with surrounding vasogenic oedema, in keeping with a high grade glioma.",
        "A {size} ml {side} cerebral mass with extensive surrounding oedema, likely high grade glioma.",
        "{Side} enhancing infiltrative tumour with oedema, most consistent with glioblastoma.",
    ),
    "infarct": (
        "Acute {side} middle cerebral artery territory infarct with restricted diffusion.",
        "There is restricted diffusion in the {side} MCA territory in keeping with an acute large vessel infarct.",
        "{Side} hemispheric acute ischaemic stroke involving cortex and white matter.",
    ),
    "hydrocephalus": (
        "The lateral ventricles are enlarged out of proportion to the sulci, in keeping with hydrocephalus.",
        "Ventriculomegaly with dilated lateral ventricles and periventricular signal change.",
        "Communicating hydrocephalus with enlargement of the lateral ventricles.",
    ),
}
_IMPRESSIONS: dict[str, str] = {
    "normal": "No acute intracranial abnormality.",
    "subdural_haemorrhage": "{Side} subdural haematoma.",
    "tumour": "{Side} high grade glioma with oedema.",
    "infarct": "Acute {side} large vessel infarct.",
    "hydrocephalus": "Hydrocephalus.",
}


def phantom_report(lesion: str, seed: int, side: str | None, volume_ml: float) -> str:
    """A short synthetic report of a phantom study (deterministic in its arguments)."""
    rng = np.random.default_rng([seed, len(lesion)])
    side = side or "bilateral"
    size = f"{max(volume_ml, 0.0) ** (1 / 3) * 2:.0f}" if lesion == "subdural_haemorrhage" else f"{volume_ml:.0f}"
    values = {"side": side, "Side": side.capitalize(), "size": size}
    finding = _FINDINGS[lesion][int(rng.integers(len(_FINDINGS[lesion])))].format(**values)
    impression = _IMPRESSIONS[lesion].format(**values)
    return f"FINDINGS: {finding} IMPRESSION: {impression}"


# --- writing and caching ----------------------------------------------------------------------------------------


def study_key(lesion: str, seed: int) -> str:
    return f"{lesion}-{seed}"


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Digest of the sources whose behaviour decides a cached study's tokens."""
    import hashlib

    import models.dicom_frames
    import models.tokenizer
    import models.volume
    import train.phantoms

    digest = hashlib.sha256(str(CACHE_FORMAT).encode())
    sources = [Path(m.__file__) for m in (models.dicom_frames, models.tokenizer, models.volume)]
    sources += sorted(Path(train.phantoms.__file__).parent.glob("*.py"))
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def _cache_path(cache_dir: Path, lesion: str, seed: int) -> Path:
    return cache_dir / f"studies-{code_fingerprint()}" / f"{study_key(lesion, seed)}.npz"


def _write_and_tokenise(cache_dir: Path, lesion: str, seed: int) -> str:
    """Runs in a worker process: phantom DICOM -> tokens -> ``<cache>/studies/<key>.npz``; returns the key."""
    from models.tokenizer import tokenize_volume
    from models.volume import SeriesSkipped, load_study
    from train.phantoms import write_phantom_study

    scratch = cache_dir / "dicom" / study_key(lesion, seed)
    try:
        study = write_phantom_study(scratch, lesion, seed=seed, fast=True)
        by_series: dict[str, list[Path]] = defaultdict(list)
        for path in study.files:
            by_series[path.parent.name].append(path)
        volumes, skipped = load_study(by_series)
        arrays: dict[str, np.ndarray] = {}
        names: list[str] = []
        for volume in volumes:
            try:
                tokens = tokenize_volume(volume)
            except SeriesSkipped as skip:
                skipped[volume.series_instance_uid] = skip.reason
                continue
            i = len(names)
            names.append(tokens.name)
            arrays[f"s{i}_patches"] = tokens.patches.astype(np.float16)
            arrays[f"s{i}_token_patch"] = tokens.token_patch.astype(np.int32)
            arrays[f"s{i}_grid_index"] = tokens.grid_index.astype(np.int16)
            arrays[f"s{i}_thin_axis"] = np.array(tokens.thin_axis)
        if not names:
            raise RuntimeError(f"phantom {lesion} seed {seed}: no usable series ({skipped})")
        truth = study.truth
        meta = {
            "format": CACHE_FORMAT,
            "uid": study.study_instance_uid,
            "labels": list(truth.labels),
            "report": phantom_report(lesion, seed, truth.side, truth.volume_ml),
            "names": names,
        }
        target = _cache_path(cache_dir, lesion, seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.stem + ".tmp.npz")
        np.savez_compressed(temporary, meta=np.array(repr(meta)), **arrays)
        os.replace(temporary, target)
        return study_key(lesion, seed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_cached_study(path: Path, lesion: str, seed: int) -> CachedStudy:
    import ast

    with np.load(path) as data:
        meta = ast.literal_eval(str(data["meta"]))
        series = [
            CachedSeries(
                name=name,
                thin_axis=int(data[f"s{i}_thin_axis"]),
                patches=data[f"s{i}_patches"],
                token_patch=data[f"s{i}_token_patch"].astype(np.int64),
                grid_index=data[f"s{i}_grid_index"].astype(np.int64),
            )
            for i, name in enumerate(meta["names"])
        ]
    return CachedStudy(
        study_key(lesion, seed), meta["uid"], lesion, seed, tuple(meta["labels"]), meta["report"], series
    )


def phantom_plan(lesions: Sequence[str], per_lesion: int, first_seed: int = 0) -> list[tuple[str, int]]:
    """(lesion, seed) of every study: seeds first_seed, first_seed+1, ... interleaved over the lesions, so each
    lesion's studies have their own seeds (own patient, geometry and noise)."""
    return [
        (lesion, first_seed + i * len(lesions) + j) for i in range(per_lesion) for j, lesion in enumerate(lesions)
    ]


def build_phantom_corpus(
    cache_dir: Path,
    plan: Sequence[tuple[str, int]],
    console: Console | None = None,
    workers: int | None = None,
) -> list[CachedStudy]:
    """The cached studies of ``plan``, writing and tokenising those not cached yet (in parallel)."""
    cache_dir = Path(cache_dir)
    current = _cache_path(cache_dir, "normal", 0).parent.name
    for stale in cache_dir.glob("studies*"):
        if stale.is_dir() and stale.name != current:  # made by older code: never read again
            shutil.rmtree(stale, ignore_errors=True)
    missing = [(lesion, seed) for lesion, seed in plan if not _cache_path(cache_dir, lesion, seed).exists()]
    if missing:
        workers = max(1, min(workers or os.cpu_count() or 1, len(missing)))
        with monitor(console, "phantoms", "Writing and tokenising phantom studies", len(missing)) as progress:
            if workers == 1:
                for lesion, seed in missing:
                    progress.advance(status=_write_and_tokenise(cache_dir, lesion, seed))
            else:
                # fork: the children only run numpy/scipy/pydicom code, and start at once
                context = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(workers, mp_context=context) as pool:
                    futures = [pool.submit(_write_and_tokenise, cache_dir, lesion, seed) for lesion, seed in missing]
                    for future in futures:
                        progress.advance(status=future.result())
    return [read_cached_study(_cache_path(cache_dir, lesion, seed), lesion, seed) for lesion, seed in plan]
