"""Model bundles for tests that need one with more than the conftest's tiny_bundle has."""
from __future__ import annotations

from pathlib import Path

import pytest

from models.bundle import random_bundle, save_bundle


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory) -> Path:
    """A tiny random Prima bundle that carries a tiny random text tower."""
    folder = tmp_path_factory.mktemp("text-bundle")
    bundle = random_bundle("tiny", seed=0, text=True)
    save_bundle(folder, bundle.vqvae, bundle.prima, bundle.manifest, text=bundle.text)
    return folder
