"""Model bundles: manifest, checksums, safe loading (models.bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.bundle import BundleError, load_bundle, random_bundle, save_bundle, sha256_of
from models.labels import DIAGNOSIS_NAMES, PRIORITY_CLASSES, REFERRALS


class NotATensor:
    """Any class: a pickle that references it would run code on a plain torch.load."""


@pytest.fixture(scope="module")
def saved_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    bundle = random_bundle("tiny", seed=3)
    thresholds = torch.linspace(-1, 1, 52).tolist()
    bundle.prima.diagnosis_heads.set_columns_and_thresholds(list(range(52)), thresholds)
    folder = save_bundle(
        tmp_path_factory.mktemp("bundle") / "prima-tiny-1",
        bundle.vqvae,
        bundle.prima,
        {"version": "1.0.0-test", "notes": "random weights, seed 3", "trained_on": "nothing"},
    )
    return folder, bundle


def test_saved_bundle_loads_back_with_identical_weights_and_thresholds(saved_bundle) -> None:
    folder, original = saved_bundle
    loaded = load_bundle(folder, device="cpu")

    for before, after in ((original.vqvae, loaded.vqvae), (original.prima, loaded.prima)):
        a, b = before.state_dict(), after.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.prima.diagnosis_heads.threshold, original.prima.diagnosis_heads.threshold)
    assert loaded.thresholds["cyst_arachnoid_cyst"] == pytest.approx(-1.0)
    assert not loaded.prima.training and not loaded.vqvae.training
    x = torch.randn(2, loaded.prima.config.embedding_dim)
    with torch.inference_mode():
        assert torch.equal(original.prima.heads(x).diagnosis_logits, loaded.prima.heads(x).diagnosis_logits)


def test_manifest_describes_the_bundle(saved_bundle) -> None:
    folder, _ = saved_bundle
    manifest = json.loads((folder / "manifest.json").read_text())

    assert manifest["family"] == "prima" and manifest["config"] == "tiny"
    assert manifest["version"] == "1.0.0-test" and manifest["created_at"].endswith("+00:00")
    assert manifest["files"] == {name: sha256_of(folder / name) for name in ("vqvae.pt", "prima.pt")}
    assert manifest["diagnosis_names"] == list(DIAGNOSIS_NAMES)
    assert manifest["priority_classes"] == list(PRIORITY_CLASSES)
    assert manifest["referral_names"] == list(REFERRALS)
    assert set(manifest["thresholds"]) == set(DIAGNOSIS_NAMES)
    assert manifest["notes"] == "random weights, seed 3" and manifest["trained_on"] == "nothing"


def test_changed_weight_file_is_refused_naming_the_file(saved_bundle, tmp_path: Path) -> None:
    _, original = saved_bundle
    copy = save_bundle(tmp_path / "copy", original.vqvae, original.prima, {"version": "x"})
    data = bytearray((copy / "prima.pt").read_bytes())
    data[-100] ^= 0xFF
    (copy / "prima.pt").write_bytes(bytes(data))

    with pytest.raises(BundleError, match=r"sha256 of prima\.pt is [0-9a-f]{64}, the manifest says"):
        load_bundle(copy)


def test_pickled_objects_are_refused_even_with_a_matching_checksum(saved_bundle, tmp_path: Path) -> None:
    _, original = saved_bundle
    copy = save_bundle(tmp_path / "evil", original.vqvae, original.prima, {"version": "x"})
    torch.save({"weight": NotATensor()}, copy / "vqvae.pt")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["vqvae.pt"] = sha256_of(copy / "vqvae.pt")
    (copy / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match="vqvae.pt is not a plain state dict"):
        load_bundle(copy)


def test_folder_without_manifest_or_of_another_family_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"family": "medimageinsight"}))
    with pytest.raises(BundleError, match="family 'medimageinsight'"):
        load_bundle(tmp_path)


def test_random_bundles_are_reproducible_and_leave_the_global_seed_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = random_bundle(seed=5), random_bundle(seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    assert all(
        torch.equal(x, y) for x, y in zip(a.prima.state_dict().values(), b.prima.state_dict().values())
    )
    assert a.version == "random-tiny-seed5"
