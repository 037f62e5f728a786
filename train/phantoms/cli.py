"""Command line: ``python -m train.phantoms OUT --lesion tumour --seed 3 --count N``.

Prints one JSON line per study written (UID, folder, truth), so scripts can pick the studies up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from train.phantoms.acquisition import SERIES
from train.phantoms.lesions import LESIONS
from train.phantoms.study import write_phantom_study


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write synthetic brain-MRI studies (multi-series DICOM) with a planted lesion.",
    )
    parser.add_argument("out", type=Path, help="output folder; studies go to OUT/<StudyInstanceUID>/")
    parser.add_argument("--lesion", default="tumour", choices=(*LESIONS, "all"),
                        help="lesion to plant; 'all' writes one study of each per seed (default: tumour)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    parser.add_argument("--count", type=int, default=1,
                        help="number of seeds: seed .. seed+count-1 (default: 1)")
    parser.add_argument("--full", action="store_true",
                        help="1 mm template and the full five-series protocol (slower) instead of fast mode")
    parser.add_argument("--series", action="append", choices=SERIES, metavar="DESCRIPTION",
                        help=f"write only this series (repeatable); one of: {', '.join(SERIES)}")
    parser.add_argument("--patient-index", type=int, default=None,
                        help="synthetic patient number for every study (default: the seed)")
    parser.add_argument("--shuffle-names", action="store_true", help="scramble file names within each series")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m train.phantoms") -> int:
    """Run the command line; returns the process exit status."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    if args.patient_index is not None and args.patient_index < 0:
        parser.error(f"--patient-index must be non-negative, got {args.patient_index}")
    lesions = LESIONS if args.lesion == "all" else (args.lesion,)
    for seed in range(args.seed, args.seed + args.count):
        for lesion in lesions:
            started = time.perf_counter()
            study = write_phantom_study(args.out, lesion, seed, fast=not args.full, series=args.series,
                                        patient_index=args.patient_index, shuffle_names=args.shuffle_names)
            truth = study.truth
            print(json.dumps({
                "study_instance_uid": study.study_instance_uid,
                "folder": str(study.folder),
                "files": len(study.files),
                "series": study.series,
                "seed": seed,
                "lesion": truth.lesion,
                "labels": list(truth.labels),
                "side": truth.side,
                "centre_ras_mm": truth.centre_ras_mm,
                "volume_ml": truth.volume_ml,
                "seconds": round(time.perf_counter() - started, 3),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
