"""The Prima patch tokenizer network: MONAI's VQ-VAE, of which inference uses only the encoder.

``full`` is the published configuration (``reference/prima.md`` §3): with it MONAI 1.6.1's ``VQVAE`` has exactly
the 47 state-dict keys of ``vqvae_model_step16799.pth`` and reproduces the reference latents bit for bit.
``tiny`` has the same structure with narrow convolutions, for tests and the demo. Both give (2, 2, 8, 8) latents
for an (8, 32, 32) patch, so the token width (289) does not depend on the size.

The ViT reads the encoder's output *before* quantisation (``VQVAE.encode``); the quantiser and decoder are kept so
that checkpoints load strictly and the model can be trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import VQVAE

#: Shared by every size: these fix the latent shape and therefore the token layout.
VQVAE_STRUCTURE: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "num_res_layers": 2,
    "downsample_parameters": ((2, 4, 1, 1), (2, 2, 1, 0)),  # (stride, kernel, dilation, padding)
    "upsample_parameters": ((2, 4, 1, 1, 0), (2, 2, 1, 0, 0)),  # (+ output padding)
    "embedding_dim": 2,
}

VQVAE_CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"channels": (256, 256), "num_res_channels": (256, 256), "num_embeddings": 8192},
    "tiny": {"channels": (8, 8), "num_res_channels": (8, 8), "num_embeddings": 64},  # fast on CPU
}

#: Latent of one (8, 32, 32) patch: 2 channels x (2, 8, 8).
LATENT_SHAPE = (2, 2, 8, 8)


def build_vqvae(config: str | Mapping[str, Any] = "full") -> VQVAE:
    """A VQ-VAE of a named size ("full", "tiny") or of explicit widths (a dict like the entries of VQVAE_CONFIGS)."""
    widths = VQVAE_CONFIGS[config] if isinstance(config, str) else dict(config)
    return VQVAE(**VQVAE_STRUCTURE, **widths)


def encode_patches(vqvae: VQVAE, patches: torch.Tensor) -> torch.Tensor:
    """(N, 1, D, H, W) patches -> (N, 2, D/4, H/4, W/4) pre-quantisation latents."""
    return vqvae.encode(patches)
