"""The VQ-VAE tokenizer network (models.vqvae): published key layout and latent shapes."""

from __future__ import annotations

import torch

from models.vqvae import build_vqvae, encode_patches


def test_full_vqvae_has_the_47_checkpoint_keys_and_shapes() -> None:
    with torch.device("meta"):  # the layout without allocating 33 M parameters
        state = build_vqvae("full").state_dict()

    assert len(state) == 47
    assert state["encoder.blocks.0.conv.weight"].shape == (256, 1, 4, 4, 4)
    for block in (1, 2, 4, 5):
        for conv in (1, 2):
            assert state[f"encoder.blocks.{block}.conv{conv}.conv.weight"].shape == (256, 256, 3, 3, 3)
    assert state["encoder.blocks.3.conv.weight"].shape == (256, 256, 2, 2, 2)
    assert state["encoder.blocks.6.conv.weight"].shape == (2, 256, 3, 3, 3)
    assert state["quantizer.quantizer.embedding.weight"].shape == (8192, 2)
    assert {"quantizer.quantizer.ema_cluster_size", "quantizer.quantizer.ema_w"} <= set(state)
    assert all(key.startswith(("encoder.blocks.", "decoder.blocks.", "quantizer.")) for key in state)
    encoder = sum(v.numel() for k, v in state.items() if k.startswith("encoder."))
    decoder = sum(v.numel() for k, v in state.items() if k.startswith("decoder."))
    assert (encoder, decoder) == (14_712_834, 18_368_513)


def test_tiny_vqvae_has_the_same_keys_and_latent_shape_for_every_orientation() -> None:
    with torch.device("meta"):
        full_keys = set(build_vqvae("full").state_dict())
    tiny = build_vqvae("tiny").eval()
    assert set(tiny.state_dict()) == full_keys

    with torch.inference_mode():
        for shape, latent in (
            ((8, 32, 32), (2, 2, 8, 8)),
            ((32, 8, 32), (2, 8, 2, 8)),
            ((32, 32, 8), (2, 8, 8, 2)),
        ):
            assert encode_patches(tiny, torch.rand(3, 1, *shape)).shape == (3, *latent)


def test_full_vqvae_encodes_a_patch_to_its_pre_quantisation_latent() -> None:
    torch.manual_seed(0)
    full = build_vqvae("full").eval()
    with torch.inference_mode():
        latent = encode_patches(full, torch.rand(2, 1, 8, 32, 32))
    assert latent.shape == (2, 2, 2, 8, 8)
    # encode() is the encoder alone: no snapping to the codebook.
    codebook = full.quantizer.quantizer.embedding.weight
    distances = torch.cdist(latent.permute(0, 2, 3, 4, 1).reshape(-1, 2), codebook)
    assert distances.min(dim=1).values.max() > 0
