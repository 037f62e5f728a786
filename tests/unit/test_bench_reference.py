"""``triage bench preprocess`` and ``--compare-reference`` (worker.commands.bench_reference): the protocol with a
reference process and the JSON it reports. The reference here is a stand-in checkout written by the test
(the public pipeline is not part of the project); it has the reference's layout and function names."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from worker.commands.bench_reference import compare
from worker.commands.bench_reference import main as bench_preprocess

#: tools/ of a stand-in checkout: the two functions and the dataset class the benchmark calls, and a package
#: __init__ that fails as the real one does where its model dependencies are missing.
STAND_IN = {
    "__init__.py": "import generative_models_that_are_not_installed\n",
    "DicomUtils.py": """
        import os

        class _Image:
            def __init__(self, slices):
                self.slices = slices

            def GetSize(self):
                return (256, 256, self.slices)

        class DicomUtils:
            @staticmethod
            def read_dicom_series(directory, new_orientation="LPS", new_size=(256, 256, None)):
                assert new_orientation is None and new_size == (None, None, None)
                names = sorted(os.listdir(directory))
                return _Image(len(names)), names, {}

            @staticmethod
            def load_mri_study(study_dir):
                print("progress the benchmark must keep off its answers")
                folders = sorted(os.listdir(study_dir))
                return [DicomUtils.read_dicom_series(os.path.join(study_dir, f), None, (None, None, None))[0]
                        for f in folders], folders
    """,
    "mrcommondataset.py": """
        class MrVoxelDataset:
            def __init__(self, volumes):
                self.volumes = volumes

            def __len__(self):
                return len(self.volumes)

            def __getitem__(self, index):
                return [0] * self.volumes[index].GetSize()[2], {}
    """,
}


@pytest.fixture(scope="module")
def stand_in_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkout = tmp_path_factory.mktemp("prima")
    (checkout / "tools").mkdir()
    for name, text in STAND_IN.items():
        (checkout / "tools" / name).write_text(textwrap.dedent(text))
    return checkout


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train.phantoms import write_phantom_study

    return write_phantom_study(tmp_path_factory.mktemp("study"), seed=1, series=["AX T2 FLAIR"]).folder


def test_comparison_runs_the_checkouts_functions_and_reports_medians_and_ratios(
    study: Path, stand_in_checkout: Path
) -> None:
    figures = compare([study], repeats=2, checkout=stand_in_checkout, python=sys.executable)

    assert figures["images_per_study"] == figures["reference_images_per_study"] == len(list(study.rglob("*.dcm")))
    assert figures["repeats"] == 2 and len(figures["runs_s"]["reference_preprocess_s"]) == 2
    assert figures["ours_vqvae_patches"] > 0
    files = len(list(study.rglob("*.dcm")))
    assert figures["reference_vqvae_patches"] == files  # the stand-in's dataset gives one patch per file
    for stage in ("read", "preprocess"):
        ratio = figures[f"reference_{stage}_s"] / figures[f"ours_{stage}_s"]
        assert figures[f"{stage}_ratio"] == pytest.approx(ratio, rel=0.02, abs=0.01)
    assert figures["reference"]["checkout"] == str(stand_in_checkout.resolve())
    assert figures["reference"]["reference_import"].startswith("modules only")
    assert "simpleitk_read_s" not in figures  # the stand-in's process never imported SimpleITK


def test_bench_without_a_reference_reports_ours_alone(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_preprocess(["--study", str(study), "--repeats", "1"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["benchmark"] == "preprocess"
    assert figures["images_per_study"] == len(list(study.rglob("*.dcm")))
    assert "preprocess_ratio" not in figures and figures["ours_preprocess_s"] > 0


def test_a_folder_that_is_not_a_prima_checkout_is_refused_with_its_path(study: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        compare([study], repeats=1, checkout=tmp_path)
