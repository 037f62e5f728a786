"""The demo's model bundle: the tiny configuration trained here on synthetic phantoms, on first use.

``ensure_demo_bundle`` returns a bundle folder and one line saying honestly how its weights were made. When the
folder holds no bundle (or ``retrain``), it trains one with :func:`train.phantom_training.train_on_phantoms`:
a few minutes on a 2-core CPU, with progress bars. The phantom corpus and the stage checkpoints are kept beside
the bundle (``<folder>-training/``), so a second training (``--retrain``) skips writing the phantoms again, and an
interrupted one resumes.

``triage bench learn`` runs the same training (by default on more phantoms) and prints the held-out AUROCs as a
JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from train.phantom_training import PhantomTrainingPlan, result_manifest_meta, train_on_phantoms

NOT_CLINICAL = "trained on synthetic phantoms, not for clinical use"


def _training_dir(folder: Path) -> Path:
    return folder.with_name(folder.name + "-training")


def _json_lines_sink(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)

    def sink(stage: str, step: int, metrics) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, **metrics}) + "\n")

    return sink


def _provenance(result, minutes: float, day: str) -> str:
    m = result.metrics
    return (
        f"tiny Prima trained here on {m['n_studies']} phantom studies (seed {result.plan.seed}, {day}, "
        f"{minutes:.1f} min on this machine's CPU, made on first use of the demo); held-out AUROC min "
        f"{m['auroc_min']:.2f} over {len(m['auroc_by_label'])} planted-lesion labels, priority (high) AUROC "
        f"{m['priority_auroc']:.2f}, on {m['n_held_out']} held-out phantoms; {NOT_CLINICAL}"
    )


def ensure_demo_bundle(
    folder: Path, retrain: bool = False, console: Console | None = None
) -> tuple[Path, str]:
    """Return (bundle folder, one-line provenance: how the weights were made). Trains the tiny model on phantom
    studies (with rich progress bars) when the folder holds no bundle or ``retrain`` is set."""
    from models.bundle import MANIFEST_FILE, BundleError, load_bundle, save_bundle

    folder = Path(folder)
    if not retrain and (folder / MANIFEST_FILE).exists():
        try:
            manifest = load_bundle(folder).manifest
            note = manifest.get("provenance") or manifest.get("notes") or "no training notes"
            if NOT_CLINICAL not in note:
                note = f"{note}; {NOT_CLINICAL}" if "phantom" in note else note
            return folder, f"loaded from {folder}, {note}"
        except BundleError as error:
            if console is not None:
                console.print(f"[yellow]The bundle in {folder} cannot be used ({error}); training a new one.")
    work = _training_dir(folder)
    if retrain:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # keep the phantom cache: it does not change
    if console is not None:
        console.print("Training the tiny demo model on synthetic phantom studies (first use; a few minutes "
                      "on a CPU)...")
    started = time.perf_counter()
    result = train_on_phantoms(work, PhantomTrainingPlan(), console, _json_lines_sink(work / "metrics.jsonl"))
    minutes = (time.perf_counter() - started) / 60
    day = datetime.now(UTC).date().isoformat()
    provenance = _provenance(result, minutes, day)
    version = f"tiny-phantoms-{day.replace('-', '')}-seed{result.plan.seed}-{result.backbone_id[:8]}"
    if folder.exists():
        shutil.rmtree(folder)
    save_bundle(folder, result.vqvae, result.prima, result_manifest_meta(result, version, provenance))
    return folder, provenance


def bench(argv: list[str]) -> int:
    """``triage bench learn``: train on phantoms, print per-label held-out AUROC; JSON line last."""
    parser = argparse.ArgumentParser(prog="triage bench learn")
    parser.add_argument("--workdir", default="var/bench-learn")
    parser.add_argument("--per-lesion", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=4, help="held-out studies per lesion type")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    plan = PhantomTrainingPlan(per_lesion=args.per_lesion, held_out_per_lesion=args.held_out, seed=args.seed)
    console = Console(stderr=True)
    started = time.perf_counter()
    result = train_on_phantoms(Path(args.workdir), plan, console)
    m = result.metrics
    line = {
        "benchmark": "learn",
        "auroc_min": m["auroc_min"],
        "auroc_by_label": m["auroc_by_label"],
        "priority_auroc": None if m["priority_auroc"] is None else round(m["priority_auroc"], 4),
        "calibration_error": None if m["calibration_error"] is None else round(m["calibration_error"], 4),
        "n_studies": m["n_studies"],
        "n_held_out": m["n_held_out"],
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "total_s": round(time.perf_counter() - started, 1),
        "seed": args.seed,
        "note": NOT_CLINICAL,
    }
    print(json.dumps(line), flush=True)
    return 0
