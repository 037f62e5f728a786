"""Model bundles: a folder with ``manifest.json``, ``vqvae.pt`` and ``prima.pt``.

The manifest names the family ("prima"), the size ("tiny"/"full", with the full architecture as data), a version,
the creation time, the sha256 of every weight file, the label names in output order, the per-head thresholds and
columns, the priority classes, the referral names and free-form training notes. Weight files are plain state
dicts written with ``torch.save`` and read with ``torch.load(weights_only=True)``: loading a bundle never runs
pickled code. Checksums are verified before anything is deserialised.

Optionally a bundle carries Prima's CLIP text tower (``prima_text.pt``, :mod:`models.prima_text`) for zero-shot
findings: its sha256 is in ``files`` beside the others, its architecture in ``text_config`` and its CLIP
temperature in ``text_temperature``. A bundle without it loads as before, with ``text`` None.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import VQVAE

from models.labels import DIAGNOSIS_NAMES, PRIORITY_CLASSES, REFERRALS
from models.prima import PRIMA_CONFIGS, PrimaConfig, PrimaModel
from models.prima_text import PRIMA_TEXT_CONFIGS, PrimaTextConfig, PrimaTextModel
from models.vqvae import VQVAE_CONFIGS, build_vqvae

FAMILY = "prima"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VQVAE_FILE = "vqvae.pt"
PRIMA_FILE = "prima.pt"
TEXT_FILE = "prima_text.pt"


class BundleError(Exception):
    """A bundle that cannot be loaded; the message names the bundle, the file and what to do."""


@dataclass
class LoadedBundle:
    path: Path | None  # None for a bundle built in memory (random_bundle)
    manifest: dict[str, Any]
    vqvae: VQVAE
    prima: PrimaModel
    text: PrimaTextModel | None = None  # Prima's CLIP text tower, where the bundle carries one

    @property
    def text_weights_id(self) -> str | None:
        """The text tower's identity for caches of its embeddings: its file's sha256 (from the verified manifest),
        or the random bundle's version; None without a text tower."""
        if self.text is None:
            return None
        return str(self.manifest["files"].get(TEXT_FILE) or f"{self.version}:text")

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def config_name(self) -> str:
        return str(self.manifest["config"])

    @property
    def diagnosis_names(self) -> tuple[str, ...]:
        return self.prima.diagnosis_names

    @property
    def thresholds(self) -> dict[str, float]:
        """Logit threshold of each diagnosis head (subtracted from the head's output)."""
        return dict(zip(self.diagnosis_names, self.prima.diagnosis_heads.threshold.tolist()))

    @property
    def referral_names(self) -> tuple[str, ...]:
        return self.prima.referral_names

    @property
    def priority_classes(self) -> tuple[str, ...]:
        return self.prima.priority_classes


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _head_table(names: tuple[str, ...], heads: Any) -> tuple[dict[str, float], dict[str, int]]:
    return (
        dict(zip(names, (float(t) for t in heads.threshold.tolist()))),
        dict(zip(names, (int(c) for c in heads.column.tolist()))),
    )


def _vqvae_widths(vqvae: VQVAE) -> dict[str, Any]:
    return {
        "channels": list(vqvae.channels),
        "num_res_channels": list(vqvae.num_res_channels),
        "num_embeddings": int(vqvae.num_embeddings),
    }


def _config_name(prima: PrimaModel) -> str:
    return next((name for name, config in PRIMA_CONFIGS.items() if config == prima.config), "custom")


def save_bundle(
    directory: str | os.PathLike[str], vqvae: VQVAE, prima: PrimaModel, meta: Mapping[str, Any],
    prima_state: Mapping[str, torch.Tensor] | None = None,
    text: PrimaTextModel | None = None,
    text_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a bundle; returns its folder. ``meta`` needs "version"; may carry "notes" (training notes),
    "created_at" and any further keys (kept in the manifest). Thresholds and columns come from the model.
    ``prima_state``: the weights to write when ``prima`` only describes the architecture (on the meta device),
    e.g. a converted checkpoint's state dict; it must fit ``prima`` exactly. ``text``: Prima's CLIP text tower to
    carry (optional; ``text_state`` as for ``prima_state``); it must project to the study ViT's CLIP width."""
    if "version" not in meta:
        raise ValueError("bundle meta needs a 'version'")
    if prima_state is None:
        prima_state = prima.state_dict()
    else:
        expected = {k: tuple(v.shape) for k, v in prima.state_dict().items()}
        if expected != {k: tuple(v.shape) for k, v in prima_state.items()}:
            raise ValueError("prima_state does not fit the model's architecture (names or shapes differ)")
    if text is not None:
        if text.config.feature_dim != prima.config.outer.out_dim:
            raise ValueError(f"the text tower projects to {text.config.feature_dim}, the study ViT to "
                             f"{prima.config.outer.out_dim}: they are not one CLIP pair")
        if text_state is None:
            text_state = text.state_dict()
        elif {k: tuple(v.shape) for k, v in text.state_dict().items()} != {k: tuple(v.shape)
                                                                             for k, v in text_state.items()}:
            raise ValueError("text_state does not fit the text tower's architecture (names or shapes differ)")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(vqvae.state_dict(), folder / VQVAE_FILE)
    torch.save(dict(prima_state), folder / PRIMA_FILE)
    weight_files = [VQVAE_FILE, PRIMA_FILE]
    if text is not None:
        torch.save(dict(text_state), folder / TEXT_FILE)
        weight_files.append(TEXT_FILE)
    else:
        (folder / TEXT_FILE).unlink(missing_ok=True)  # a re-written bundle must not keep a stale text tower

    thresholds, columns = _head_table(prima.diagnosis_names, prima.diagnosis_heads)
    referral_thresholds, referral_columns = _head_table(prima.referral_names, prima.referral_heads)
    manifest = {
        **{k: v for k, v in meta.items() if k not in {"files"}},
        "family": FAMILY,
        "format": FORMAT_VERSION,
        "config": _config_name(prima),
        "version": str(meta["version"]),
        "created_at": meta.get("created_at") or datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {name: sha256_of(folder / name) for name in weight_files},
        "prima_config": prima.config.to_dict(),
        "vqvae_config": _vqvae_widths(vqvae),
        "diagnosis_names": list(prima.diagnosis_names),
        "thresholds": thresholds,
        "diagnosis_columns": columns,
        "diagnosis_outputs": prima.diagnosis_heads.dims[-1],
        "priority_classes": list(prima.priority_classes),
        "referral_names": list(prima.referral_names),
        "referral_thresholds": referral_thresholds,
        "referral_columns": referral_columns,
        "referral_outputs": prima.referral_heads.dims[-1],
        "notes": meta.get("notes", ""),
    }
    if text is not None:
        manifest["text_config"] = text.config.to_dict()
        manifest["text_temperature"] = float(text.temperature)
    else:
        manifest.pop("text_config", None)
        manifest.pop("text_temperature", None)
    temporary = folder / (MANIFEST_FILE + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    temporary.replace(folder / MANIFEST_FILE)  # the manifest appears only once the weights are complete
    return folder


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise BundleError(f"{folder} is not a model bundle: {MANIFEST_FILE} is missing") from None
    except json.JSONDecodeError as error:
        raise BundleError(f"{folder / MANIFEST_FILE} is not valid JSON: {error}") from None
    if manifest.get("family") != FAMILY:
        raise BundleError(f"{folder}: family {manifest.get('family')!r} is not {FAMILY!r}")
    missing = [k for k in ("version", "config", "files", "diagnosis_names") if k not in manifest]
    if missing:
        raise BundleError(f"{folder / MANIFEST_FILE} lacks {', '.join(missing)}")
    return manifest


def _verified_state_dict(folder: Path, name: str, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    expected = manifest["files"].get(name)
    path = folder / name
    if expected is None:
        raise BundleError(f"{folder / MANIFEST_FILE} lists no sha256 for {name}")
    if not path.exists():
        raise BundleError(f"bundle {folder}: {name} is missing")
    actual = sha256_of(path)
    if actual != expected:
        raise BundleError(
            f"bundle {folder}: sha256 of {name} is {actual}, the manifest says {expected}; "
            "the file is corrupt or was changed after the bundle was made - copy the bundle again"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:  # weights_only refusals too
        raise BundleError(f"bundle {folder}: {name} is not a plain state dict of tensors: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"bundle {folder}: {name} is not a state dict (a mapping of names to tensors)")
    return state


def _build_models(manifest: Mapping[str, Any], device: torch.device | str) -> tuple[VQVAE, PrimaModel]:
    """Models of the manifest's architecture with uninitialised weights on ``device`` (to be loaded)."""
    config_name = manifest["config"]
    if "prima_config" in manifest:
        config = PrimaConfig.from_dict(manifest["prima_config"])
    elif config_name in PRIMA_CONFIGS:
        config = PRIMA_CONFIGS[config_name]
    else:
        raise BundleError(f"unknown config {config_name!r} and no prima_config in the manifest")
    vqvae_widths = manifest.get("vqvae_config") or VQVAE_CONFIGS.get(config_name)
    if vqvae_widths is None:
        raise BundleError(f"unknown config {config_name!r} and no vqvae_config in the manifest")
    # Built on the meta device: the full heads are 2.3 B parameters, and random initialisation would only be
    # overwritten by the checkpoint.
    with torch.device("meta"):
        vqvae = build_vqvae(vqvae_widths)
        prima = PrimaModel(
            config,
            diagnosis_names=manifest["diagnosis_names"],
            referral_names=manifest.get("referral_names", REFERRALS),
            priority_classes=manifest.get("priority_classes", PRIORITY_CLASSES),
            diagnosis_outputs=manifest.get("diagnosis_outputs"),
            referral_outputs=manifest.get("referral_outputs"),
        )
    return vqvae.to_empty(device=device), prima.to_empty(device=device)


def _apply_head_tables(prima: PrimaModel, manifest: Mapping[str, Any]) -> None:
    for names, heads, thresholds_key, columns_key in (
        (prima.diagnosis_names, prima.diagnosis_heads, "thresholds", "diagnosis_columns"),
        (prima.referral_names, prima.referral_heads, "referral_thresholds", "referral_columns"),
    ):
        thresholds = manifest.get(thresholds_key, {})
        columns = manifest.get(columns_key, {})
        heads.set_columns_and_thresholds(
            [int(columns.get(name, i)) for i, name in enumerate(names)],
            [float(thresholds.get(name, 0.0)) for name in names],
        )


def load_bundle(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedBundle:
    """Verify and load a bundle onto ``device``; models are returned in eval mode."""
    return _load(Path(directory), device, mapped=False)


def map_bundle(directory: str | os.PathLike[str]) -> LoadedBundle:
    """Verify a bundle (checksums, manifest, every tensor's name and shape) without reading its weights into
    memory: installing, registering and readiness checks must not allocate the 11 GB of a full-size bundle just
    to check it. The VQ-VAE and the study encoder hold the files' memory-mapped tensors (enough for
    ``models.backbone.backbone_id``); the stacked heads stay on the meta device. Not for inference."""
    return _load(Path(directory), "meta", mapped=True)


def _load(folder: Path, device: str | torch.device, mapped: bool) -> LoadedBundle:
    manifest = _read_manifest(folder)
    vqvae_state = _verified_state_dict(folder, VQVAE_FILE, manifest)
    prima_state = _verified_state_dict(folder, PRIMA_FILE, manifest)
    vqvae, prima = _build_models(manifest, device)
    for name, model, state in ((VQVAE_FILE, vqvae, vqvae_state), (PRIMA_FILE, prima, prima_state)):
        try:
            model.load_state_dict(state, strict=True, assign=mapped)
        except RuntimeError as error:
            raise BundleError(
                f"bundle {folder}: {name} does not fit the manifest's architecture: {error}"
            ) from None
    if mapped:
        for heads in (prima.diagnosis_heads, prima.referral_heads):  # their tables are not in the state dict
            heads.threshold = torch.empty_like(heads.threshold, device="cpu")
    _apply_head_tables(prima, manifest)
    text = _load_text(folder, manifest, device, mapped)
    return LoadedBundle(folder, manifest, vqvae.eval(), prima.eval(), text)


def _load_text(folder: Path, manifest: Mapping[str, Any], device: str | torch.device,
               mapped: bool) -> PrimaTextModel | None:
    """The bundle's text tower, verified like the other weights; None where the bundle has none."""
    if TEXT_FILE not in manifest["files"]:
        return None
    if "text_config" not in manifest:
        raise BundleError(f"{folder / MANIFEST_FILE} lists {TEXT_FILE} but no text_config")
    try:
        config = PrimaTextConfig.from_dict(manifest["text_config"])
    except TypeError as error:
        raise BundleError(f"{folder / MANIFEST_FILE}: text_config is not a text tower's: {error}") from None
    state = _verified_state_dict(folder, TEXT_FILE, manifest)
    with torch.device("meta"):
        text = (PrimaTextModel(config, float(manifest["text_temperature"])) if "text_temperature" in manifest
                else PrimaTextModel(config))
    text = text.to_empty(device=device)
    try:
        text.load_state_dict(state, strict=True, assign=mapped)
    except RuntimeError as error:
        raise BundleError(f"bundle {folder}: {TEXT_FILE} does not fit the manifest's text_config: {error}") from None
    return text.eval()


def random_bundle(config: str = "tiny", seed: int = 0, version: str | None = None,
                  text: bool = False) -> LoadedBundle:
    """A bundle with random weights, in memory (tests, demos). Thresholds are 0; ``save_bundle`` writes it.
    ``text``: with a random text tower of the same size (zero-shot findings)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vqvae = build_vqvae(config)
        prima = PrimaModel(PRIMA_CONFIGS[config], DIAGNOSIS_NAMES, REFERRALS, PRIORITY_CLASSES)
        text_model = PrimaTextModel(PRIMA_TEXT_CONFIGS[config]).eval() if text else None
    finally:
        torch.random.set_rng_state(generator_state)  # tests that build bundles do not perturb each other
    manifest = {
        "family": FAMILY,
        "format": FORMAT_VERSION,
        "config": config,
        "version": version or f"random-{config}-seed{seed}",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {},
        "diagnosis_names": list(DIAGNOSIS_NAMES),
        "priority_classes": list(PRIORITY_CLASSES),
        "referral_names": list(REFERRALS),
        "notes": "random weights: for tests and demos only, predictions mean nothing",
    }
    return LoadedBundle(None, manifest, vqvae.eval(), prima.eval(), text_model)
