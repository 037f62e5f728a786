"""Reading Prima's published checkpoints safely (models.reference_checkpoint); fixtures in fixtures/prima_parity."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.bundle import load_bundle, sha256_of
from models.labels import DIAGNOSIS_NAMES
from models.prima import PRIMA_CONFIGS, PrimaBatch, PrimaModel, convert_reference_state_dict
from models.reference_checkpoint import (
    ReferenceCheckpointError,
    export_reference_bundle,
    load_reference_prima,
    load_reference_vqvae,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "prima_parity"
REFERRALS = ["neurosurgery", "neurology", "stroke_team"]


@pytest.fixture(scope="module")
def full_size_pickle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference's FullMRIModel at the published sizes, every tensor a stride-0 view (kilobytes on disk)."""
    path = tmp_path_factory.mktemp("fullsize") / "fullmodel.pt"
    with gzip.open(FIXTURES / "fullmodel_fullsize_strided.pt.gz", "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


def full_model_on_meta(referrals: list[str]) -> PrimaModel:
    with torch.device("meta"):  # 2.4 B parameters: shapes only
        return PrimaModel(
            PRIMA_CONFIGS["full"],
            referral_names=referrals,
            diagnosis_outputs=52,
            referral_outputs=len(referrals),
        )


def test_official_full_size_state_dict_loads_strictly_into_the_full_configuration() -> None:
    shapes = json.loads((FIXTURES / "fullsize_state_shapes.json").read_text())
    with torch.device("meta"):
        official = {key: torch.empty(shape) for key, shape in shapes.items()}
    assert len(official) == 1088 and "clipvisualmodel.innerViT.cls_token" in official
    assert official["m1.51.0.weight"].shape == (4000, 10240)

    model = full_model_on_meta(REFERRALS)
    model.load_state_dict(convert_reference_state_dict(official), strict=True, assign=True)
    assert model.visual.innerViT.cls_token.shape == (1, 20, 289)


def test_full_size_whole_module_checkpoint_loads_through_the_safe_loader(full_size_pickle: Path) -> None:
    checkpoint = load_reference_prima(full_size_pickle)

    assert checkpoint.config == PRIMA_CONFIGS["full"]
    assert checkpoint.diagnosis.names == list(DIAGNOSIS_NAMES)
    assert checkpoint.diagnosis.columns == list(range(52)) and set(checkpoint.diagnosis.thresholds) == {0.25}
    assert checkpoint.diagnosis.widths == [10240, 4000, 1000, 52]
    assert checkpoint.referral.names == REFERRALS and checkpoint.priority_classes == ("none", "low", "high")
    # The pickle named the GPT-2 tower and the DataParallel wrapper; none of their code ran.
    assert "transformers.models.gpt2.modeling_gpt2.GPT2Block" in checkpoint.reference_classes
    assert "torch.nn.parallel.data_parallel.DataParallel" in checkpoint.reference_classes
    assert "tools.models.FullMRIModel" in checkpoint.reference_classes

    model = full_model_on_meta(REFERRALS)
    model.load_state_dict(checkpoint.state_dict, strict=True, assign=True)


def test_reduced_checkpoint_metadata_comes_from_the_pickle_in_checkpoint_order() -> None:
    checkpoint = load_reference_prima(FIXTURES / "fullmodel_reduced.pt")
    with np.load(FIXTURES / "parity.npz") as expected:
        names = list(expected["diagnosis_names"])

    assert checkpoint.diagnosis.names == names and sorted(names) == sorted(DIAGNOSIS_NAMES)
    assert checkpoint.diagnosis.columns == [DIAGNOSIS_NAMES.index(n) for n in names]  # idx = class index
    assert all(-1 <= t <= 1 for t in checkpoint.diagnosis.thresholds)
    assert checkpoint.config.series_name_variant == "A" and checkpoint.config.variant_a_text_out == 16
    assert "complete_visual_model.FullMRIModel" in checkpoint.reference_classes
    assert "model_parts.HierViT" in checkpoint.reference_classes


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"model": RunsCode(marker)}, tmp_path / "evil.pt")

    with pytest.raises(
        ReferenceCheckpointError, match=r"references (posix|os)\.system.*nothing from the file"
    ):
        load_reference_prima(tmp_path / "evil.pt")
    assert not marker.exists()


class Unexpected(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)


def test_unknown_classes_and_other_objects_are_refused_naming_what_was_found(tmp_path: Path) -> None:
    torch.save(Unexpected(), tmp_path / "unknown.pt")
    with pytest.raises(ReferenceCheckpointError, match=r"unknown\.pt: the pickle references \S*Unexpected"):
        load_reference_prima(tmp_path / "unknown.pt")

    torch.save(nn.Linear(2, 2), tmp_path / "linear.pt")
    with pytest.raises(ReferenceCheckpointError, match="is a Linear, not a FullMRIModel"):
        load_reference_prima(tmp_path / "linear.pt")

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ReferenceCheckpointError, match="not a readable torch checkpoint"):
        load_reference_prima(tmp_path / "junk.pt")

    with pytest.raises(ReferenceCheckpointError, match="not a plain state dict"):
        load_reference_vqvae(FIXTURES / "fullmodel_reduced.pt")


def test_exported_bundle_records_its_sources_and_predicts_like_the_reference(tmp_path: Path) -> None:
    folder = export_reference_bundle(
        FIXTURES / "fullmodel_reduced.pt",
        FIXTURES / "vqvae_reduced.pt",
        tmp_path / "bundle",
        version="ref-test",
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["prima"] == {
        "file": "fullmodel_reduced.pt",
        "sha256": sha256_of(FIXTURES / "fullmodel_reduced.pt"),
        "reference_classes": load_reference_prima(FIXTURES / "fullmodel_reduced.pt").reference_classes,
    }
    assert manifest["source"]["vqvae"]["sha256"] == sha256_of(FIXTURES / "vqvae_reduced.pt")

    bundle = load_bundle(folder)
    with np.load(FIXTURES / "parity.npz") as expected:
        study = [
            (torch.from_numpy(expected[f"{s}_tokens"]), str(n))
            for s, n in zip(("axial", "coronal", "sagittal"), expected["series_names"])
        ]
        with torch.inference_mode():
            output = bundle.prima(PrimaBatch.from_studies([study], [str(expected["study_description"])]))
        assert np.max(np.abs(output.embedding.numpy() - expected["clip_emb"])) <= 1e-4
        assert np.max(np.abs(output.diagnosis_logits[0].numpy() - expected["diagnosis"])) <= 1e-4
    assert bundle.thresholds == dict(zip(manifest["diagnosis_names"], manifest["thresholds"].values()))
