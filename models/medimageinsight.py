"""MedImageInsight: DaViT image tower + bidirectional text tower, projected to one L2-normalised space.

The image tower is the Florence-2 "huge" DaViT (depths 1,1,9,1; widths 256-2048; window 12; 3x3 downsampling;
channel attention v2), which timm builds as ``davit_huge_fl``; here the same :class:`timm.models.davit.DaVit` class
is configured from data, so ``full`` (the published network) and ``tiny`` (small widths for CPU tests and the demo)
are two configurations of one code path. Its pooled, LayerNormed feature (B, width) is multiplied by
``image_projection`` (no bias) and L2-normalised. The text tower is :mod:`models.text_tower`.

The official weights file (``medimageinsigt-v1.0.0.pt``, a safetensors file despite its name) holds 601 float32
tensors named ``image_encoder.*`` (Florence-2 names), ``lang_encoder.*``, ``image_projection``,
``lang_projection`` and ``logit_scale``. :func:`official_to_model` renames them to this module's names (a pure
function, like timm's ``checkpoint_filter_fn``; unlike timm's own Florence-2 converter it maps the final
``norms`` LayerNorm to ``head.norm``), and :func:`load_medimageinsight` loads them strictly: every tensor of the
file is used, every parameter of the model is set, shapes agree, or the error lists what does not. The file is
read with safetensors (no pickle), tensor by tensor, into a model built on the meta device.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.text_tower import TextTower, TextTowerConfig

#: ImageNet normalisation, as the reference preprocessing uses.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MedImageInsightConfig:
    name: str
    depths: tuple[int, ...]
    embed_dims: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int = 12
    image_size: int = 480
    projection_dim: int = 1024
    text: TextTowerConfig = field(default_factory=TextTowerConfig)


#: The published network (615,996,417 parameters).
FULL = MedImageInsightConfig("full", depths=(1, 1, 9, 1), embed_dims=(256, 512, 1024, 2048),
                             num_heads=(8, 16, 32, 64))
#: The same structure with head width 32 kept and few channels, layers and projection dimensions.
TINY = MedImageInsightConfig("tiny", depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8),
                             projection_dim=64, text=TextTowerConfig(width=64, heads=2, layers=2))
CONFIGS = {"full": FULL, "tiny": TINY}


class CheckpointMismatch(ValueError):
    """The weights file does not fit the configured network; the message lists every difference."""


def build_image_tower(config: MedImageInsightConfig, device=None) -> nn.Module:
    from timm.models.davit import DaVit

    return DaVit(depths=config.depths, embed_dims=config.embed_dims, num_heads=config.num_heads,
                 window_size=config.window_size, down_kernel_size=3, channel_attn_v2=True, named_blocks=True,
                 num_classes=0, drop_path_rate=0.0, device=device)


class MedImageInsight(nn.Module):
    """Both towers and their projections; ``encode_image``/``encode_text`` give L2-normalised embeddings."""

    def __init__(self, config: MedImageInsightConfig = FULL, device=None) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = build_image_tower(config, device=device)
        self.lang_encoder = TextTower(config.text, device=device)
        self.image_projection = nn.Parameter(torch.empty(config.embed_dims[-1], config.projection_dim,
                                                         device=device))
        self.lang_projection = nn.Parameter(torch.empty(config.text.width, config.projection_dim, device=device))
        self.logit_scale = nn.Parameter(torch.ones([], device=device))
        if device is None or torch.device(device).type != "meta":
            nn.init.trunc_normal_(self.image_projection, std=0.02)
            nn.init.trunc_normal_(self.lang_projection, std=0.02)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> the tower's pooled, LayerNormed feature (B, width)."""
        return self.image_encoder(pixels)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.image_features(pixels) @ self.image_projection.to(pixels.dtype)
        return x / x.norm(dim=-1, keepdim=True)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.lang_encoder(input_ids, attention_mask)
        x = TextTower.pooled(hidden, input_ids) @ self.lang_projection.to(hidden.dtype)
        return x / x.norm(dim=-1, keepdim=True)

    @property
    def scale(self) -> float:
        """exp(logit_scale): the temperature of image-text similarities."""
        return float(self.logit_scale.detach().float().exp())


# -- the official checkpoint ---------------------------------------------------------------------------------
_IMAGE_RENAMES = (
    (re.compile(r"^convs\.0\.proj\."), "stem.conv."),
    (re.compile(r"^convs\.0\.norm\."), "stem.norm."),
    (re.compile(r"^convs\.(\d+)\.proj\."), r"stages.\1.downsample.conv."),
    (re.compile(r"^convs\.(\d+)\.norm\."), r"stages.\1.downsample.norm."),
    (re.compile(r"^blocks\.(\d+)\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"\.(window|channel)_attn\.norm\."), ".norm1."),
    (re.compile(r"\.(window|channel)_attn\.fn\."), ".attn."),
    (re.compile(r"\.ffn\.norm\."), ".norm2."),
    (re.compile(r"\.ffn\.fn\.net\."), ".mlp."),
    (re.compile(r"\.conv1\.fn\.dw\."), ".cpe1.proj."),
    (re.compile(r"\.conv2\.fn\.dw\."), ".cpe2.proj."),
    # The final LayerNorm after pooling: timm's Florence-2 converter leaves it out, which leaves it at its init.
    (re.compile(r"^norms\."), "head.norm."),
)
# Names the reference's own loader accepts from older checkpoints.
_OLD_PREFIXES = (("visual.", "image_encoder."), ("text.", "lang_encoder."))
_OLD_NAMES = {"vision_projection": "image_projection", "text_projection": "lang_projection"}


def official_to_model(name: str) -> str:
    """One tensor name of the official file -> the name of the same parameter in :class:`MedImageInsight`."""
    for old, new in _OLD_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
    name = _OLD_NAMES.get(name, name)
    if name.startswith("image_encoder."):
        rest = name[len("image_encoder."):]
        for pattern, replacement in _IMAGE_RENAMES:
            rest = pattern.sub(replacement, rest)
        return "image_encoder." + rest
    return name


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file's header, without reading any tensor data."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise CheckpointMismatch(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > 100_000_000:
            raise CheckpointMismatch(f"{path}: not a safetensors file (header length {length}); the official "
                                     f"weights are safetensors despite the .pt name, pickles are not loaded")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointMismatch(f"{path}: not a safetensors file (unreadable header: {exc}); pickled "
                                     f"checkpoints are not loaded") from exc
    header.pop("__metadata__", None)
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}


def check_checkpoint(header: dict[str, tuple[str, tuple[int, ...]]], config: MedImageInsightConfig,
                     where: str = "checkpoint") -> dict[str, str]:
    """The file's name -> model name map when every tensor fits the model exactly; else CheckpointMismatch."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MedImageInsight(config, device="meta").state_dict().items()}
    renamed: dict[str, str] = {}
    problems: list[str] = []
    for name, (dtype, shape) in header.items():
        target = official_to_model(name)
        if target in renamed.values():
            problems.append(f"{name}: a second tensor for {target}")
        elif target not in expected:
            problems.append(f"{name}: unexpected (no parameter {target} in the {config.name} network)")
        elif shape != expected[target]:
            problems.append(f"{name}: shape {list(shape)}, the {config.name} network needs {list(expected[target])}")
        elif dtype not in ("F32", "F16", "BF16"):
            problems.append(f"{name}: dtype {dtype} is not a floating-point type")
        renamed[name] = target
    missing = sorted(set(expected) - set(renamed.values()))
    problems += [f"{target}: missing from the file" for target in missing]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointMismatch(f"{where} does not fit MedImageInsight {config.name!r} "
                                 f"({len(header)} tensors in the file, {len(expected)} in the network): {shown}")
    return renamed


def load_medimageinsight(path: str | Path, config: MedImageInsightConfig = FULL, device: str = "cpu",
                         dtype: torch.dtype = torch.float32) -> MedImageInsight:
    """The official weights file (or one with its names) loaded strictly into ``config``, in eval mode."""
    from safetensors import safe_open

    path = Path(path)
    renamed = check_checkpoint(read_safetensors_header(path), config, where=str(path))
    model = MedImageInsight(config, device="meta")
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for name, target in renamed.items():
            state[target] = handle.get_tensor(name).to(device=device, dtype=dtype)
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointMismatch(f"{path}: not set by the file: {leftover}")
    return model.eval()


def model_to_official(name: str, config: MedImageInsightConfig = FULL) -> str:
    """Inverse of :func:`official_to_model` for this network's parameter names (to write files in the official
    naming, e.g. test checkpoints)."""
    table = _official_names(config)
    return table[name]


def official_state_dict(model: MedImageInsight) -> dict[str, torch.Tensor]:
    """The model's tensors under the official file's names."""
    table = _official_names(model.config)
    return {table[k]: v for k, v in model.state_dict().items()}


def _official_names(config: MedImageInsightConfig) -> dict[str, str]:
    # Built by enumerating the official naming scheme for this configuration and checking each name maps onto a
    # model parameter, so the inverse never guesses.
    names: list[str] = ["image_projection", "lang_projection", "logit_scale"]
    names += ["lang_encoder.positional_embedding", "lang_encoder.token_embedding.weight",
              "lang_encoder.ln_final.weight", "lang_encoder.ln_final.bias"]
    for layer in range(config.text.layers):
        p = f"lang_encoder.resblocks.{layer}."
        names += [p + "attn.in_proj_weight", p + "attn.in_proj_bias", p + "attn.out_proj.weight",
                  p + "attn.out_proj.bias"]
        names += [p + f"{m}.{w}" for m in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj") for w in ("weight", "bias")]
    for stage, depth in enumerate(config.depths):
        names += [f"image_encoder.convs.{stage}.{m}.{w}" for m in ("proj", "norm") for w in ("weight", "bias")]
        for block in range(depth):
            for kind, attn in (("spatial_block", "window_attn"), ("channel_block", "channel_attn")):
                p = f"image_encoder.blocks.{stage}.{block}.{kind}."
                parts = ["conv1.fn.dw", f"{attn}.norm", f"{attn}.fn.qkv", f"{attn}.fn.proj", "conv2.fn.dw",
                         "ffn.norm", "ffn.fn.net.fc1", "ffn.fn.net.fc2"]
                names += [p + f"{m}.{w}" for m in parts for w in ("weight", "bias")]
    names += ["image_encoder.norms.weight", "image_encoder.norms.bias"]
    table = {official_to_model(n): n for n in names}
    with torch.device("meta"):
        expected = set(MedImageInsight(config, device="meta").state_dict())
    if set(table) != expected or len(table) != len(names):
        raise AssertionError(f"official naming out of step with the network: "
                             f"{sorted(expected ^ set(table))[:10]}")
    return table
