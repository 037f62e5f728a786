"""Prima's published checkpoints, read without running code from them, and exported as a model bundle.

``primafullmodel107.pt`` is a whole pickled ``FullMRIModel`` (``reference/prima.md`` §6): loading it the usual way
imports the reference's classes and runs whatever the pickle names. Here the pickle is read by a restricted
unpickler: every class it names must be on an allow-list (the reference's own modules, ``torch.nn`` modules, the
GPT-2 text tower from ``transformers``) and becomes an *inert stub* that only stores its attributes; the only
callables it may reach are torch's tensor/parameter rebuild functions, ``OrderedDict`` and ``set``. Anything else
stops the load with the offending name, before anything from the file has run. From the stubs we take what
inference needs: the HierViT weights and architecture, every diagnosis/referral head with its name, output
column (``idx``) and threshold (``thresh``), and the priority head with its class count.

``vqvae_model_step16799.pth`` is a plain state dict and loads with ``torch.load(weights_only=True)``.

:func:`export_reference_bundle` writes both as one of our bundles (:mod:`models.bundle`) whose manifest records
the sha256 of each published file it was made from.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Self

import torch
from monai.networks.nets import VQVAE

from models.bundle import save_bundle, sha256_of
from models.labels import LEGACY_PRIORITY_CLASSES, PRIORITY_CLASSES
from models.prima import PrimaConfig, PrimaModel, TextEncoderConfig, ViTConfig, convert_reference_state_dict
from models.prima_text import PrimaTextConfig, PrimaTextModel, convert_reference_text_state, text_config_of
from models.vqvae import VQVAE_CONFIGS, build_vqvae

#: Modules whose classes may appear in the pickle; each becomes an inert stub. ``__main__`` only for
#: FullMRIModel (the reference's loader aliases it there).
_REFERENCE_MODULES = re.compile(
    r"^(model|model_parts|patchify|complete_visual_model|tools\.models|"
    r"Prima_training_and_evaluation(\.(model|model_parts|patchify))?)$"
)
_LIBRARY_MODULES = re.compile(
    r"^(torch\.nn\.modules(\.\w+)*|torch\.nn\.parallel(\.\w+)*|transformers(\.\w+)*)$"
)
_ALLOWED_CALLABLES: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
}
_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class ReferenceCheckpointError(Exception):
    """A published checkpoint that cannot be read safely or does not have the expected content."""


class InertObject:
    """Stand-in for a class named by the pickle: created without running its code, holds its state only."""

    reference_class = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            self.__dict__["_constructor_args"] = (args, kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict | None):
            state, slots = state
            self.__dict__.update(slots or {})
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<inert {self.reference_class}>"


_STUBS: dict[tuple[str, str], type[InertObject]] = {}


def _stub(module: str, name: str) -> type[InertObject]:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name, (InertObject,), {"reference_class": f"{module}.{name}"})
    return _STUBS[key]


def _resolve_global(module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_CALLABLES:
        return _ALLOWED_CALLABLES[(module, name)]
    if module == "torch" and name in _TORCH_DTYPES:
        return getattr(torch, name)
    known_module = _REFERENCE_MODULES.match(module) or _LIBRARY_MODULES.match(module)
    if known_module and name.isidentifier() and name[:1].isupper():  # classes only, never functions
        return _stub(module, name)
    if module == "__main__" and name == "FullMRIModel":
        return _stub(module, name)
    raise ReferenceCheckpointError(
        f"the pickle references {module}.{name}, which a Prima checkpoint does not contain; refusing to load it "
        "(nothing from the file was executed)"
    )


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _resolve_global(module, name)


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: torch adds storages and its tensor records on top."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(pickle.load)
    loads = staticmethod(pickle.loads)
    __name__ = "restricted_pickle"


def read_whole_module_checkpoint(path: str | PathLike[str]) -> InertObject:
    """The pickled object tree of a whole-module checkpoint, as inert stubs and tensors (memory-mapped)."""
    path = Path(path)
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule, mmap=True
        )
    except ReferenceCheckpointError as error:
        raise ReferenceCheckpointError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise ReferenceCheckpointError(f"{path} is not a readable torch checkpoint: {error}") from None


# --- walking the stub tree ---------------------------------------------------------------------------------


def _class_name(obj: Any) -> str:
    return getattr(obj, "reference_class", type(obj).__name__).rsplit(".", 1)[-1]


def _children(obj: Any) -> Mapping[str, Any]:
    return getattr(obj, "__dict__", {}).get("_modules") or {}


def _child(obj: Any, *path: str) -> Any:
    for name in path:
        children = _children(obj)
        if name not in children:
            raise ReferenceCheckpointError(
                f"expected a submodule {name!r} in {_class_name(obj)}, found {sorted(children) or 'none'}"
            )
        obj = children[name]
    return obj


def _attribute(obj: Any, name: str, default: Any = None) -> Any:
    return getattr(obj, "__dict__", {}).get(name, default)


def stub_state_dict(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """What ``nn.Module.state_dict()`` would return for the module the stub stands for."""
    state: dict[str, torch.Tensor] = {}
    attributes = getattr(obj, "__dict__", {})
    for name, tensor in (attributes.get("_parameters") or {}).items():
        if tensor is not None:
            state[prefix + name] = tensor
    skip = attributes.get("_non_persistent_buffers_set") or set()
    for name, tensor in (attributes.get("_buffers") or {}).items():
        if tensor is not None and name not in skip:
            state[prefix + name] = tensor
    for name, child in _children(obj).items():
        if child is not None:
            state.update(stub_state_dict(child, f"{prefix}{name}."))
    return state


def _mlp_layout(head: Any, what: str) -> tuple[list[int], list[int]]:
    """Indices of the Linear layers of a Linear/ReLU stack and its widths [in, hidden..., out]."""
    linear, widths = [], []
    previous = None
    for index, layer in _children(head).items():
        kind = _class_name(layer)
        if kind == "Linear":
            if previous == "Linear":
                raise ReferenceCheckpointError(f"{what}: two Linear layers without a ReLU between them")
            weight = _attribute(layer, "_parameters", {})["weight"]
            if widths and widths[-1] != weight.shape[1]:
                raise ReferenceCheckpointError(
                    f"{what}: layer {index} reads {weight.shape[1]}, not {widths[-1]}"
                )
            widths = widths or [int(weight.shape[1])]
            widths.append(int(weight.shape[0]))
            linear.append(int(index))
            previous = kind
        elif kind == "ReLU":
            previous = kind
        elif kind not in ("Dropout", "Identity"):
            raise ReferenceCheckpointError(
                f"{what}: unexpected layer {kind} (only Linear/ReLU/Dropout are known)"
            )
    if not linear or previous != "Linear":
        raise ReferenceCheckpointError(f"{what}: not a stack of Linear layers ending in a Linear")
    return linear, widths


def _renumbered_head(head: Any, prefix: str, what: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A head's tensors under our keys ``{prefix}{2j}.weight`` (our heads are Linear, ReLU, Linear, ...)."""
    linear, widths = _mlp_layout(head, what)
    state = {}
    for j, index in enumerate(linear):
        layer = _child(head, str(index))
        for kind in ("weight", "bias"):
            state[f"{prefix}{2 * j}.{kind}"] = _attribute(layer, "_parameters")[kind]
    return state, widths


@dataclass
class HeadTable:
    names: list[str]
    columns: list[int]
    thresholds: list[float]
    widths: list[int]  # [in, hidden..., out] shared by every head of the table

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self.widths[1:-1])


def _head_table(root: Any, dict_attribute: str, list_module: str, prefix: str, state: dict) -> HeadTable:
    heads = _attribute(root, dict_attribute)
    if not isinstance(heads, dict):
        raise ReferenceCheckpointError(f"FullMRIModel has no {dict_attribute} dictionary")
    listed = list(_children(_child(root, list_module)).values()) if heads else []
    if len(listed) != len(heads):
        raise ReferenceCheckpointError(
            f"{dict_attribute} has {len(heads)} heads but {list_module} {len(listed)}"
        )
    table = HeadTable([], [], [], [])
    for position, (name, entry) in enumerate(heads.items()):
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[1], int)):
            raise ReferenceCheckpointError(f"{dict_attribute}[{name!r}] is not [head, column]: {entry!r}")
        head, column = entry
        if head is not listed[position]:
            raise ReferenceCheckpointError(f"{dict_attribute}[{name!r}] is not {list_module}.{position}")
        threshold = _attribute(head, "thresh")
        if not isinstance(threshold, int | float):
            raise ReferenceCheckpointError(f"{dict_attribute}[{name!r}] has no numeric thresh: {threshold!r}")
        head_state, widths = _renumbered_head(head, f"{prefix}{position}.", f"{dict_attribute}[{name!r}]")
        if table.widths and widths != table.widths:
            raise ReferenceCheckpointError(
                f"{dict_attribute}[{name!r}] has widths {widths}, the first head {table.widths}"
            )
        if not 0 <= column < widths[-1]:
            raise ReferenceCheckpointError(
                f"{dict_attribute}[{name!r}] reads column {column} of {widths[-1]}"
            )
        state.update(head_state)
        table.names.append(str(name))
        table.columns.append(int(column))
        table.thresholds.append(float(threshold))
        table.widths = widths
    return table


def _vit_config(vit: Any, what: str) -> ViTConfig:
    parameters = _attribute(vit, "_parameters") or {}
    if "cls_token" not in parameters:
        raise ReferenceCheckpointError(f"{what} has no cls_token")
    _, registers, dim = parameters["cls_token"].shape
    layers = list(_children(_child(vit, "transformer", "layers")).values())
    if not layers:
        raise ReferenceCheckpointError(f"{what} has no transformer layers")
    depth, heads, dim_head, mlp_dim = _transformer_shape(layers, what)
    out_dim = _attribute(_child(vit, "mlp_head", "0"), "_parameters")["weight"].shape[0]
    return ViTConfig(int(dim), depth, heads, dim_head, mlp_dim, int(registers), int(out_dim))


def _transformer_shape(layers: Sequence[Any], what: str) -> tuple[int, int, int, int]:
    attention = _child(layers[0], "0", "fn")
    heads, dim_head = _attribute(attention, "heads"), _attribute(attention, "dim_head")
    if not (isinstance(heads, int) and isinstance(dim_head, int)):
        raise ReferenceCheckpointError(f"{what}: attention without integer heads/dim_head")
    mlp_dim = _attribute(_child(layers[0], "1", "fn", "net", "0"), "_parameters")["weight"].shape[0]
    return len(layers), heads, dim_head, int(mlp_dim)


def _text_config(encoder: Any, what: str) -> TextEncoderConfig:
    if _class_name(encoder) != "SerieTransformerEncoder":
        raise ReferenceCheckpointError(f"{what} is a {_class_name(encoder)}, not a SerieTransformerEncoder")
    embed = _attribute(_child(encoder, "embed"), "_parameters")["weight"]
    dim = int(_attribute(encoder, "embsize", embed.shape[1] + 10))
    if dim - embed.shape[1] != 10:
        raise ReferenceCheckpointError(
            f"{what}: {embed.shape[1]} embedding channels + 10 position channels != {dim}"
        )
    depth, heads, dim_head, mlp_dim = _transformer_shape(
        list(_children(_child(encoder, "transformer", "layers")).values()), what
    )
    return TextEncoderConfig(dim=dim, depth=depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim)


@dataclass
class ReferenceCheckpoint:
    """What inference needs from ``primafullmodel107.pt``, in our layout."""

    config: PrimaConfig
    state_dict: dict[str, torch.Tensor]  # PrimaModel keys
    diagnosis: HeadTable
    referral: HeadTable
    priority_classes: tuple[str, ...]
    reference_classes: list[str] = field(default_factory=list)  # every class the pickle named

    def _model_on_meta(self) -> PrimaModel:
        with torch.device("meta"):
            return PrimaModel(
                self.config,
                diagnosis_names=self.diagnosis.names,
                referral_names=self.referral.names,
                priority_classes=self.priority_classes,
                diagnosis_outputs=self.diagnosis.widths[-1],
                referral_outputs=self.referral.widths[-1] if self.referral.widths else None,
            )

    def describe_model(self) -> PrimaModel:
        """The architecture with its head tables (columns, thresholds) and no weights (meta device): what a
        bundle's manifest needs, without the 11 GB of a full-size model in memory."""
        model = self._model_on_meta()
        for heads, table in ((model.diagnosis_heads, self.diagnosis), (model.referral_heads, self.referral)):
            heads.threshold = torch.empty_like(heads.threshold, device="cpu")  # the tables are read, not meta
            heads.set_columns_and_thresholds(table.columns, table.thresholds)
        return model

    def build_model(self, device: str | torch.device = "cpu") -> PrimaModel:
        """A PrimaModel with these weights on ``device``; built on the meta device first, so the 2.3 B head
        parameters are allocated once and never randomly initialised."""
        model = self._model_on_meta()
        model.to_empty(device=device)
        model.load_state_dict(self.state_dict, strict=True)
        model.diagnosis_heads.set_columns_and_thresholds(self.diagnosis.columns, self.diagnosis.thresholds)
        model.referral_heads.set_columns_and_thresholds(self.referral.columns, self.referral.thresholds)
        return model.eval()


def _unwrap(root: Any) -> Any:
    while "module" in _children(root) and _class_name(root) in ("DataParallel", "DistributedDataParallel"):
        root = _child(root, "module")
    return root


def _all_classes(obj: Any, seen: set[int], found: set[str]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, InertObject):
        found.add(obj.reference_class)
        values = obj.__dict__.values()
    elif isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, list | tuple | set):
        values = obj
    else:
        return
    for value in values:
        _all_classes(value, seen, found)


def load_reference_prima(path: str | PathLike[str]) -> ReferenceCheckpoint:
    """Read a published ``FullMRIModel`` pickle safely; raises :class:`ReferenceCheckpointError` with the reason."""
    path = Path(path)
    pickled = read_whole_module_checkpoint(path)
    classes: set[str] = set()
    _all_classes(pickled, set(), classes)
    root = _unwrap(pickled)
    if _class_name(root) != "FullMRIModel":
        raise ReferenceCheckpointError(
            f"{path}: the pickled object is a {_class_name(root)}, not a FullMRIModel"
        )
    try:
        checkpoint = _reference_checkpoint(root)
    except ReferenceCheckpointError as error:
        raise ReferenceCheckpointError(f"{path}: {error}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise ReferenceCheckpointError(
            f"{path}: unexpected content ({type(error).__name__}: {error})"
        ) from None
    checkpoint.reference_classes = sorted(classes)
    return checkpoint


def _reference_checkpoint(root: InertObject) -> ReferenceCheckpoint:
    visual = _child(root, "clipvisualmodel")
    if not (_attribute(visual, "useseriename") and _attribute(visual, "usestudydescription")):
        raise ReferenceCheckpointError("HierViT without series names or study description is not supported")
    inner = _vit_config(_child(visual, "innerViT"), "innerViT")
    outer = _vit_config(_child(visual, "outerViT"), "outerViT")
    series_encoder = _child(visual, "serieencoder")
    study_text = _text_config(_child(visual, "studyencoder"), "studyencoder")
    if _class_name(series_encoder) == "Sequential":
        variant = "A"
        series_text = _text_config(_child(series_encoder, "0"), "serieencoder.0")
        text_out = int(_attribute(_child(series_encoder, "0", "linear"), "_parameters")["weight"].shape[0])
    else:
        variant = "B"
        series_text = _text_config(series_encoder, "serieencoder")
        text_out = 128
    if series_text != study_text:
        raise ReferenceCheckpointError(
            f"series-name encoder {series_text} and study-description encoder {study_text} differ"
        )

    state = convert_reference_state_dict(
        {f"clipvisualmodel.{k}": v for k, v in stub_state_dict(visual).items()}
    )
    diagnosis = _head_table(root, "diagnosisheads", "m1", "diagnosis_heads.", state)
    referral = _head_table(root, "referralheads", "m2", "referral_heads.", state)
    priority_state, priority_widths = _renumbered_head(
        _child(root, "priorityhead"), "priority_head.", "priorityhead"
    )
    state.update(priority_state)
    n_priority = priority_widths[-1]
    if n_priority == len(PRIORITY_CLASSES):
        priority_classes = PRIORITY_CLASSES
    elif n_priority == len(LEGACY_PRIORITY_CLASSES):
        priority_classes = LEGACY_PRIORITY_CLASSES
    else:
        raise ReferenceCheckpointError(f"priority head has {n_priority} outputs; 3 or 4 are known")
    embedding = outer.registers * outer.dim
    for table, what in ((diagnosis, "diagnosis"), (referral, "referral")):
        if table.widths and table.widths[0] != embedding:
            raise ReferenceCheckpointError(f"{what} heads read {table.widths[0]} features, not {embedding}")
    config = PrimaConfig(
        inner=inner,
        outer=outer,
        text=series_text,
        series_name_variant=variant,
        variant_a_text_out=text_out,
        diagnosis_hidden=diagnosis.hidden,
        referral_hidden=referral.hidden or diagnosis.hidden,
        priority_hidden=tuple(priority_widths[1:-1]),
    )
    return ReferenceCheckpoint(config, state, diagnosis, referral, priority_classes)


# --- the CLIP text tower -----------------------------------------------------------------------------------------


@dataclass
class ReferenceText:
    """Prima's GPT-2 text tower from the checkpoint, in our layout (:mod:`models.prima_text`)."""

    config: PrimaTextConfig
    state_dict: dict[str, torch.Tensor]
    temperature: float

    def build_model(self, device: str | torch.device = "cpu") -> PrimaTextModel:
        with torch.device("meta"):
            model = PrimaTextModel(self.config, self.temperature)
        model.to_empty(device=device)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def _reference_text(root: InertObject) -> ReferenceText:
    clip = _unwrap(_child(root, "clipmodel"))
    wrapper = _child(clip, "text_model")
    if _class_name(wrapper) != "GPTWrapper":
        raise ReferenceCheckpointError(f"clipmodel.text_model is a {_class_name(wrapper)}, not a GPTWrapper")
    gpt = _child(wrapper, "model")
    if _class_name(gpt) != "GPT2Model":
        raise ReferenceCheckpointError(f"clipmodel.text_model.model is a {_class_name(gpt)}, not a GPT2Model")
    # Heads, epsilon and activation are not in the tensors' shapes: the pickled GPT2Config carries them.
    gpt_config = _attribute(gpt, "config")
    heads = _attribute(gpt_config, "n_head", 12)
    eps = _attribute(gpt_config, "layer_norm_epsilon", 1e-5)
    activation = _attribute(gpt_config, "activation_function", "gelu_new")
    if activation != "gelu_new" or not isinstance(heads, int) or not isinstance(eps, int | float):
        raise ReferenceCheckpointError(
            f"GPT-2 text tower with n_head={heads!r}, layer_norm_epsilon={eps!r}, activation {activation!r}: "
            "only GPT-2's own (integer heads, gelu_new) is supported")
    state = convert_reference_text_state(
        {f"clipmodel.text_model.{k}": v for k, v in stub_state_dict(wrapper).items()})
    try:
        config = text_config_of(state, heads=heads, eps=float(eps))
    except KeyError as error:
        raise ReferenceCheckpointError(str(error)) from None
    parameters = _attribute(clip, "_parameters") or {}
    temperature = parameters.get("temperature")
    if temperature is None:  # a buffer or plain attribute when the model was built without a trained one
        temperature = _attribute(clip, "temperature")
    if not isinstance(temperature, torch.Tensor) or temperature.numel() != 1:
        raise ReferenceCheckpointError(f"clipmodel.temperature is not a one-element tensor: {temperature!r}")
    return ReferenceText(config, state, float(temperature.reshape(()).item()))


def load_reference_prima_text(path: str | PathLike[str]) -> ReferenceText:
    """The CLIP text tower of a published ``FullMRIModel`` pickle, read safely (nothing in it runs)."""
    path = Path(path)
    root = _unwrap(read_whole_module_checkpoint(path))
    if _class_name(root) != "FullMRIModel":
        raise ReferenceCheckpointError(f"{path}: the pickled object is a {_class_name(root)}, not a FullMRIModel")
    try:
        return _reference_text(root)
    except ReferenceCheckpointError as error:
        raise ReferenceCheckpointError(f"{path}: {error}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise ReferenceCheckpointError(f"{path}: unexpected text tower ({type(error).__name__}: {error})") from None


# --- VQ-VAE --------------------------------------------------------------------------------------------------


def vqvae_widths_of(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The widths of a VQ-VAE state dict in the published layout (the rest of the structure is fixed)."""
    try:
        channels = int(state["encoder.blocks.0.conv.weight"].shape[0])
        res_channels = int(state["encoder.blocks.1.conv1.conv.weight"].shape[0])
        codes = int(state["quantizer.quantizer.embedding.weight"].shape[0])
    except KeyError as error:
        raise ReferenceCheckpointError(f"not a Prima VQ-VAE state dict: {error.args[0]} is missing") from None
    return {
        "channels": (channels, channels),
        "num_res_channels": (res_channels, res_channels),
        "num_embeddings": codes,
    }


def load_reference_vqvae(path: str | PathLike[str], device: str | torch.device = "cpu") -> VQVAE:
    """``vqvae_model_step16799.pth`` (a plain state dict) -> our VQ-VAE, strictly; never unpickles objects."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise ReferenceCheckpointError(f"{path} is not a plain state dict of tensors: {error}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReferenceCheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    vqvae = build_vqvae(vqvae_widths_of(state)).to(device)
    try:
        vqvae.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ReferenceCheckpointError(f"{path} does not fit the published VQ-VAE layout: {error}") from None
    return vqvae.eval()


def export_reference_bundle(
    prima_path: str | PathLike[str],
    vqvae_path: str | PathLike[str],
    directory: str | PathLike[str],
    version: str = "prima-107",
    text: bool = True,
) -> Path:
    """Read both published checkpoints safely and write them as a bundle; the manifest records their sha256.
    ``text``: carry the checkpoint's CLIP text tower too (zero-shot findings); a checkpoint without a readable one
    is refused then (ReferenceCheckpointError), since a bundle that silently lost it would not say why."""
    prima_path, vqvae_path = Path(prima_path), Path(vqvae_path)
    checkpoint = load_reference_prima(prima_path)
    reference_text = load_reference_prima_text(prima_path) if text else None
    if reference_text is not None:
        with torch.device("meta"):
            text_model = PrimaTextModel(reference_text.config, reference_text.temperature)
    else:
        text_model = None
    vqvae = load_reference_vqvae(vqvae_path)
    config_name = "full" if vqvae_widths_of(vqvae.state_dict()) == VQVAE_CONFIGS["full"] else "custom"
    # The weights are written straight from the checkpoint's memory-mapped tensors (already in our layout);
    # building the model would first copy all 11 GB of a full-size one into memory.
    return save_bundle(
        directory,
        vqvae,
        checkpoint.describe_model(),
        {
            "version": version,
            "notes": f"exported from the published Prima checkpoints ({config_name} VQ-VAE)",
            "source": {
                "prima": {
                    "file": prima_path.name,
                    "sha256": sha256_of(prima_path),
                    "reference_classes": checkpoint.reference_classes,
                },
                "vqvae": {"file": vqvae_path.name, "sha256": sha256_of(vqvae_path)},
            },
        },
        prima_state=checkpoint.state_dict,
        text=text_model,
        text_state=reference_text.state_dict if reference_text is not None else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.reference_checkpoint",
        description="Export Prima's published checkpoints as a model bundle without executing pickled code",
    )
    parser.add_argument("prima", help="primafullmodel107.pt")
    parser.add_argument("vqvae", help="vqvae_model_step16799.pth")
    parser.add_argument("out", help="bundle folder to write")
    parser.add_argument("--version", default="prima-107")
    parser.add_argument("--no-text", action="store_true", help="leave the CLIP text tower out (no zero-shot)")
    args = parser.parse_args(argv)
    try:
        folder = export_reference_bundle(args.prima, args.vqvae, args.out, args.version, text=not args.no_text)
    except ReferenceCheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
