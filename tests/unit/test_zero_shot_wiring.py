"""Zero-shot findings in the product: a slice_knn CT study and a neuro_mri study whose bundle carries Prima's text
tower get zero-shot findings in their SR, as findings of their own algorithm (TID 4019 names the zero-shot
method) beside the kNN's or the heads'; the bundle carries the text tower with its sha256."""
from __future__ import annotations

import json

import pydicom
import pytest
import torch

from models.bundle import TEXT_FILE, BundleError, load_bundle, random_bundle, save_bundle
from pacs_bridge.sr import read_sr
from tests.support.bundles import text_bundle  # noqa: F401 (the fixture)
from tests.support.slice_evidence import world  # noqa: F401 (the slice_knn CT fixture)


def test_zero_shot_switched_off_leaves_the_slice_knn_result_as_it_was(world):  # noqa: F811
    world.settings.zero_shot.enabled = False
    outcome = world.processor.process(world.run_of[world.uids[0]], worker_name="cpu0")
    assert outcome.status == "done" and outcome.result.zero_shot is None
    assert read_sr(pydicom.dcmread(outcome.sr_path)).zero_shot is None


def test_a_bundle_carries_the_text_tower_with_its_sha256_and_refuses_a_changed_one(text_bundle, tmp_path):
    import shutil

    manifest = json.loads((text_bundle / "manifest.json").read_text())
    assert TEXT_FILE in manifest["files"] and manifest["text_config"]["feature_dim"] == 32
    loaded = load_bundle(text_bundle)
    original = random_bundle("tiny", seed=0, text=True).text
    for (name, a), (_, b) in zip(loaded.text.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.text_weights_id == manifest["files"][TEXT_FILE]

    copy = tmp_path / "copy"
    shutil.copytree(text_bundle, copy)
    state = torch.load(copy / TEXT_FILE, weights_only=True)
    state["mlp_head.1.bias"] = state["mlp_head.1.bias"] + 1
    torch.save(state, copy / TEXT_FILE)
    with pytest.raises(BundleError, match=f"sha256 of {TEXT_FILE}"):
        load_bundle(copy)

    plain = random_bundle("tiny", seed=0)
    save_bundle(copy, plain.vqvae, plain.prima, plain.manifest)  # re-written without one: no stale text tower
    assert load_bundle(copy).text is None and not (copy / TEXT_FILE).exists()


