"""``triage bench preprocess``: DICOM folder to VQ-VAE input per study, ours against the Prima pipeline's.

Two stages are timed on the same study folder (``<study>/<series>/*.dcm``):

- **reading**: files to image headers and stored pixels. Ours: :func:`models.dicom_frames.read_dataset`,
  ``frame_headers`` and ``decode_frames`` for every file. The reference: its ``DicomUtils.read_dicom_series``
  with resizing and reorienting off (GDCM's series file names, its size filter, SimpleITK's series reader).
- **preprocessing**: the whole way to the VQ-VAE's input. Ours: :func:`models.volume.load_study`, then
  :func:`models.tokenizer.tokenize_volume` and :func:`models.tokenizer.vqvae_input` per volume. The reference:
  ``DicomUtils.load_mri_study`` and every item of its ``MrVoxelDataset`` (what its ``pipeline.py`` runs
  before the tokenizer model).

The reference runs from a checkout the user names (``--compare-reference PATH``, e.g. a clone of
MLNeurosurg/Prima), in a process of the Python the user names (``--reference-python``, default this one),
which needs the checkout's own dependencies (SimpleITK, natsort, MONAI, torch). Nothing of it is copied here:
that process imports the checkout's modules by path and calls its functions. Its package ``__init__`` also
loads the model code (monai-generative); where that import fails, the two modules above are imported on their
own (``reference_import`` says which). Both sides run in one process each, on the same files, alternately,
after one untimed warm-up; the figures are medians and the ratios are the reference's time over ours.

Run as a script (``python bench_reference.py --serve CHECKOUT``) this module is that reference process: it
reads one study folder per line on stdin and answers one JSON line of timings. It imports only the standard
library at the top, so the reference's Python needs nothing of this project.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

#: The reference's Python modules this benchmark calls (under the checkout's ``tools`` package).
REFERENCE_MODULES = ("tools.DicomUtils", "tools.mrcommondataset")


def series_folders(study: Path) -> list[Path]:
    return sorted(p for p in Path(study).iterdir() if p.is_dir())


# --- ours ------------------------------------------------------------------------------------------------


def our_reading(study: Path) -> int:
    """Every file of the study to frame headers and stored pixels; returns the number of images."""
    from models.dicom_frames import decode_frames, frame_headers, read_dataset

    images = 0
    for folder in series_folders(study):
        for path in sorted(folder.glob("*.dcm")):
            ds = read_dataset(path)
            images += len(frame_headers(ds, path))
            decode_frames(ds)
    return images


def our_preprocessing(study: Path) -> int:
    """The study to VQ-VAE input tensors, as the worker makes them; returns the number of patches."""
    import torch

    from models.tokenizer import tokenize_volume, vqvae_input
    from models.volume import load_study

    volumes, _ = load_study({folder.name: sorted(folder.glob("*.dcm")) for folder in series_folders(study)})
    patches = 0
    for volume in volumes:
        tokens = tokenize_volume(volume)
        patches += len(vqvae_input(torch.from_numpy(tokens.patches), tokens.thin_axis))
    return patches


# --- the reference, in its own process ------------------------------------------------------------------


def _import_reference(checkout: Path) -> tuple[dict[str, object], str]:
    """The reference's modules by name, and how they were imported ("package" or "modules only")."""
    import importlib
    import importlib.util

    sys.path.insert(0, str(checkout))
    try:
        return {name: importlib.import_module(name) for name in REFERENCE_MODULES}, "package"
    except ImportError as error:
        # The package __init__ imports the model loaders too (monai-generative), which preprocessing never
        # uses: make `tools` a bare package of the checkout's folder and import the two modules alone.
        for name in [n for n in sys.modules if n == "tools" or n.startswith("tools.")]:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            "tools", checkout / "tools" / "__init__.py", submodule_search_locations=[str(checkout / "tools")]
        )
        package = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["tools"] = package
        modules = {name: importlib.import_module(name) for name in REFERENCE_MODULES}
        return modules, f"modules only (the package's __init__ failed: {error})"


def _serve_reference(checkout: Path) -> int:
    """The reference process: one study folder per stdin line, one JSON line of timings per study."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != here]  # our worker/ must not shadow the reference's modules
    answer = sys.stdout
    # The reference prints progress; keep our answer channel to JSON alone.
    sys.stdout = sys.stderr
    modules, how = _import_reference(checkout)
    dicom_utils = modules["tools.DicomUtils"].DicomUtils  # type: ignore[attr-defined]
    voxel_dataset = modules["tools.mrcommondataset"].MrVoxelDataset  # type: ignore[attr-defined]
    answer.write(json.dumps({"ready": True, "reference_import": how}) + "\n")
    answer.flush()
    for line in sys.stdin:
        study = Path(line.strip())
        started = time.perf_counter()
        images = 0
        for folder in series_folders(study):
            image, _, _ = dicom_utils.read_dicom_series(
                str(folder), new_orientation=None, new_size=(None, None, None)
            )
            images += image.GetSize()[2]
        read_s = time.perf_counter() - started

        # SimpleITK's series reader alone (the library the reference reads with, without its size filter's
        # extra pass over the headers): the strictest reading figure to compare with.
        simpleitk = sys.modules.get("SimpleITK")
        simpleitk_read_s = None
        if simpleitk is not None:
            started = time.perf_counter()
            for folder in series_folders(study):
                reader = simpleitk.ImageSeriesReader()
                reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
                reader.Execute()
            simpleitk_read_s = time.perf_counter() - started

        started = time.perf_counter()
        volumes, _ = dicom_utils.load_mri_study(str(study))
        dataset = voxel_dataset(volumes)
        patches = sum(len(dataset[i][0]) for i in range(len(dataset)))
        preprocess_s = time.perf_counter() - started
        answer.write(
            json.dumps(
                {
                    "read_s": read_s,
                    "simpleitk_read_s": simpleitk_read_s,
                    "preprocess_s": preprocess_s,
                    "images": images,
                    "series": len(volumes),
                    "patches": patches,
                }
            )
            + "\n"
        )
        answer.flush()
    return 0


def _without_this_project(search_path: str) -> str:
    """PYTHONPATH less this project's root: the reference's process runs the checkout's code, not ours."""
    root = Path(__file__).resolve().parents[1]
    return os.pathsep.join(p for p in search_path.split(os.pathsep) if p and Path(p).resolve() != root)


class ReferenceProcess:
    """The reference pipeline in a process of ``python``, kept running so that its imports are paid once."""

    def __init__(self, checkout: Path, python: str) -> None:
        self.checkout = Path(checkout).resolve()
        if not (self.checkout / "tools" / "DicomUtils.py").is_file():
            raise FileNotFoundError(
                f"{self.checkout} is not a checkout of the Prima pipeline (no tools/DicomUtils.py)"
            )
        # Open as long as the process runs; close() closes it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        # Threads as in ours: the same process-wide defaults (torch's intra-op pool) on both sides.
        self._process = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--serve", str(self.checkout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=self.checkout,
            env={**os.environ, "PYTHONPATH": _without_this_project(os.environ.get("PYTHONPATH", ""))},
        )
        self.hello = self._answer()

    def _answer(self) -> dict:
        line = self._process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"the reference process stopped: {tail}")
        return json.loads(line)

    def run(self, study: Path) -> dict:
        self._process.stdin.write(f"{Path(study).resolve()}\n")  # type: ignore[union-attr]
        self._process.stdin.flush()  # type: ignore[union-attr]
        return self._answer()

    def close(self) -> None:
        if self._process.stdin:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stderr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _commit(checkout: Path) -> str | None:
    result = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or None if result.returncode == 0 else None


def _timed(function, study: Path) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    count = function(study)
    return time.perf_counter() - started, count


def compare(
    studies: list[Path], *, repeats: int, checkout: Path | None = None, python: str | None = None
) -> dict:
    """Median seconds per study of both stages, ours and (with ``checkout``) the reference's, and the ratios.

    Each repeat runs every study once on each side, ours then the reference's, so that load on the machine
    falls on both alike; one untimed run of the first study on each side comes first (imports, file cache).
    """
    runs: dict[str, list[float]] = {
        "ours_read_s": [],
        "ours_preprocess_s": [],
        "reference_read_s": [],
        "simpleitk_read_s": [],
        "reference_preprocess_s": [],
    }
    reference = ReferenceProcess(checkout, python or sys.executable) if checkout is not None else None
    counts: dict[str, object] = {}
    try:
        our_reading(studies[0])
        our_preprocessing(studies[0])
        if reference is not None:
            reference.run(studies[0])
        for _ in range(repeats):
            for study in studies:
                seconds, counts["images"] = _timed(our_reading, study)
                runs["ours_read_s"].append(seconds)
                seconds, counts["patches"] = _timed(our_preprocessing, study)
                runs["ours_preprocess_s"].append(seconds)
                if reference is not None:
                    answer = reference.run(study)
                    runs["reference_read_s"].append(answer["read_s"])
                    runs["reference_preprocess_s"].append(answer["preprocess_s"])
                    if answer["simpleitk_read_s"] is not None:
                        runs["simpleitk_read_s"].append(answer["simpleitk_read_s"])
                    counts["reference_images"], counts["reference_patches"] = (
                        answer["images"],
                        answer["patches"],
                    )
    finally:
        if reference is not None:
            reference.close()

    result: dict[str, object] = {
        "studies": len(studies),
        "repeats": repeats,
        "images_per_study": counts["images"],
        "ours_read_s": round(statistics.median(runs["ours_read_s"]), 6),
        "ours_preprocess_s": round(statistics.median(runs["ours_preprocess_s"]), 6),
        "ours_vqvae_patches": counts["patches"],
    }
    if reference is not None:
        reference_read = statistics.median(runs["reference_read_s"])
        reference_preprocess = statistics.median(runs["reference_preprocess_s"])
        if runs["simpleitk_read_s"]:
            simpleitk_read = statistics.median(runs["simpleitk_read_s"])
            result["simpleitk_read_s"] = round(simpleitk_read, 6)
            result["read_ratio_simpleitk_alone"] = round(
                simpleitk_read / statistics.median(runs["ours_read_s"]), 2
            )
        result.update(
            {
                "reference_read_s": round(reference_read, 6),
                "reference_preprocess_s": round(reference_preprocess, 6),
                "reference_images_per_study": counts["reference_images"],
                "reference_vqvae_patches": counts["reference_patches"],
                "read_ratio": round(reference_read / statistics.median(runs["ours_read_s"]), 2),
                "preprocess_ratio": round(
                    reference_preprocess / statistics.median(runs["ours_preprocess_s"]), 2
                ),
                "reference": {
                    "checkout": str(reference.checkout),
                    "commit": _commit(reference.checkout),
                    "python": python or sys.executable,
                    "reference_import": reference.hello["reference_import"],
                },
            }
        )
    result["runs_s"] = {name: [round(v, 6) for v in values] for name, values in runs.items() if values}
    return result


def add_reference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compare-reference",
        metavar="PATH",
        type=Path,
        help="a checkout of the public Prima pipeline (MLNeurosurg/Prima): run its preprocessing "
        "on the same studies and report the ratios",
    )
    parser.add_argument(
        "--reference-python",
        metavar="PYTHON",
        default=sys.executable,
        help="the Python (with SimpleITK, natsort, MONAI, torch) that runs the reference (default: this one)",
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="triage bench preprocess", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--study", type=Path, help="a study folder (<study>/<series>/*.dcm); default: a phantom"
    )
    parser.add_argument(
        "--series", nargs="*", default=None, help="phantom series (default: the fast set: FLAIR, DWI, ADC)"
    )
    parser.add_argument("--full", action="store_true", help="the full-resolution phantom protocol")
    parser.add_argument("--repeats", type=int, default=5)
    add_reference_options(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="triage-bench-preprocess-") as tmp:
        if args.study:
            study, described = args.study, str(args.study)
        else:
            from train.phantoms import write_phantom_study

            study = write_phantom_study(Path(tmp), seed=0, fast=not args.full, series=args.series).folder
            described = (
                f"phantom ({'full' if args.full else 'fast'}: {', '.join(args.series or ['default'])})"
            )
        figures = compare(
            [study], repeats=args.repeats, checkout=args.compare_reference, python=args.reference_python
        )
    print(json.dumps({"benchmark": "preprocess", "study": described, "cpus": os.cpu_count(), **figures}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        with contextlib.suppress(BrokenPipeError):
            sys.exit(_serve_reference(Path(sys.argv[2])))
    sys.exit(main(sys.argv[1:]))
