"""Identity of a bundle's study encoder (VQ-VAE + HierViT): stored embeddings are only comparable under one.

Heads retrained every night read study embeddings stored in the database; those are valid for exactly the
encoder weights that made them. ``backbone_id`` is a digest of those weights (not of the heads), written into
every bundle the training makes and read back from the manifest, or computed for a bundle made elsewhere.
"""
from __future__ import annotations

import hashlib

import torch
from monai.networks.nets import VQVAE

from models.prima import PrimaModel


def backbone_id(vqvae: VQVAE, prima: PrimaModel) -> str:
    digest = hashlib.sha256()
    for prefix, module in (("vqvae.", vqvae), ("visual.", prima.visual)):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update((prefix + name).encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def bundle_backbone_id(bundle) -> str:
    """The manifest's ``backbone_id`` when present, else computed from the loaded weights."""
    return str(bundle.manifest.get("backbone_id") or backbone_id(bundle.vqvae, bundle.prima))
