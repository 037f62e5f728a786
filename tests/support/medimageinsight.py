"""Test support for MedImageInsight: deterministic random weights under the official tensor names.

The parity fixtures in ``tests/fixtures/medimageinsight`` were produced by running the public reference on the
weights this function makes (see the README there), so the tests regenerate the same weights instead of
committing them. Each tensor is drawn from its own generator seeded by the tensor's name, so the values do not
depend on the order in which names are listed. Scales keep activations of a random network well-conditioned:
LayerNorm weights near 1 and biases non-zero (so a LayerNorm left at its initial values, or a bias dropped, shows),
matrices scaled by 1/sqrt(fan-in).
"""
from __future__ import annotations

import math
import zlib

import torch

PARITY_SEED = 20240927


def random_official_weights(shapes: dict[str, tuple[int, ...]], seed: int = PARITY_SEED) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if name == "logit_scale":
            value = math.log(1 / 0.07) + 0.1 * noise
        elif len(shape) == 1 and leaf == "weight":  # LayerNorm scales
            value = 1.0 + 0.2 * noise
        elif len(shape) == 1:  # biases (incl. in_proj_bias)
            value = 0.05 * noise
        elif name.endswith("positional_embedding") or name.endswith("token_embedding.weight"):
            value = 0.5 * noise
        elif name in ("image_projection", "lang_projection"):
            value = noise / math.sqrt(shape[0])
        else:  # linear and conv weights (out, in, ...): fan-in is the product of all but the first dimension
            value = noise / math.sqrt(math.prod(shape[1:]))
        out[name] = value.to(torch.float32).contiguous()
    return out


def write_safetensors_streaming(path, shapes: dict[str, tuple[int, ...]], make) -> None:
    """A float32 safetensors file written one tensor at a time (``make(name, shape)`` -> tensor), so a 2.5 GB
    file never needs 2.5 GB of memory to write."""
    import json
    import struct

    offsets, start = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        offsets[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [start, start + size]}
        start += size
    header = json.dumps(offsets, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        for name, shape in shapes.items():
            tensor = make(name, tuple(shape)).to(torch.float32).contiguous()
            handle.write(tensor.numpy().tobytes())
