"""``triage models install PATH``: official weights or a ready bundle, verified, into the models folder and the
model registry, so that workers can serve them.

What PATH may be:

- a bundle folder (``manifest.json`` + weights, :mod:`models.bundle`): its sha256s are checked against the
  manifest, it is copied into the models folder (``training.models_dir``) and registered;
- Prima's published ``primafullmodel107.pt`` with ``--vqvae vqvae_model_step16799.pth``: read by the safe loader
  (:mod:`models.reference_checkpoint`: no pickled code runs), written as a bundle into the models folder (the
  manifest records the sha256 of both published files) and registered;
- MedImageInsight's ``medimageinsigt-v1.0.0.pt`` (a safetensors file): every tensor's name and shape checked
  against the network, copied into ``<models folder>/medimageinsight/``; the slice-evidence model is configured
  by ``slice_evidence.weights`` (it is not a registry version), which the command prints.

``--sha256`` (and ``--vqvae-sha256``) check a downloaded file against a digest the operator has; a file under the
official MedImageInsight name must match the published digest. A bundle is written under a temporary name and
renamed only once it verifies, so a failed install leaves nothing behind. The first Prima model installed is
promoted (nothing served before); later ones are candidates unless ``--promote`` is given.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from sql import model_registry
from train import registry

#: Digests published with the official files (the Hugging Face LFS pointer of lion-ai/MedImageInsights,
#: reference/medimageinsight.md §5). Prima's release (Google Drive) publishes none: pass --sha256.
PUBLISHED_SHA256 = {
    "medimageinsigt-v1.0.0.pt": "5eeda63bf616a61664bc95b2c09d3b3d7125209e635678bd3f5f324e9bdb1414",
}
PRIMA_CHECKPOINT_VERSION = {"primafullmodel107.pt": "prima-107"}


class InstallError(Exception):
    """An install that cannot be done; the message names the file and what to do. Nothing was installed."""


@dataclass(frozen=True)
class InstallOutcome:
    kind: str  # "bundle" | "prima-checkpoint" | "medimageinsight"
    path: Path  # where it was installed
    version: str | None = None  # the registry version (Prima bundles)
    promoted: bool = False
    setting: str | None = None  # a configuration line the operator must set (MedImageInsight)


def _check_sha256(path: Path, expected: str | None, what: str) -> str:
    # models.bundle, medimageinsight and reference_checkpoint import torch: each install step imports what it
    # needs, so that the other `triage models` commands (which import this module) start without it.
    from models.bundle import sha256_of

    actual = sha256_of(path)
    if expected and actual != expected.lower():
        raise InstallError(f"{what} {path}: sha256 is {actual}, expected {expected.lower()}; the download is "
                           "incomplete or another file: download it again")
    return actual


def _is_safetensors(path: Path) -> bool:
    from models.medimageinsight import CheckpointMismatch, read_safetensors_header

    try:
        read_safetensors_header(path)
    except CheckpointMismatch:
        return False
    return True


def install(engine: Engine, source: str | Path, models_dir: str | Path, *, vqvae: str | Path | None = None,
            version: str | None = None, sha256: str | None = None, vqvae_sha256: str | None = None,
            promote: bool | None = None, slice_config: str = "full") -> InstallOutcome:
    """Install ``source`` (see the module's docstring); raises :class:`InstallError` with the reason."""
    source, models_dir = Path(source).resolve(), Path(models_dir).resolve()
    if not source.exists():
        raise InstallError(f"{source} does not exist")
    models_dir.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        if sha256 or vqvae:
            raise InstallError(f"{source} is a bundle folder: its manifest carries the sha256s; --sha256 and "
                               "--vqvae are for official checkpoint files")
        return _register(engine, _install_bundle(source, models_dir), "bundle", promote)
    if _is_safetensors(source):
        return _install_medimageinsight(source, models_dir, sha256, slice_config)
    if vqvae is None:
        raise InstallError(f"{source} is not a bundle folder or a safetensors file; a Prima checkpoint "
                           "(primafullmodel107.pt) needs its VQ-VAE: --vqvae vqvae_model_step16799.pth")
    folder = _install_prima_checkpoint(source, Path(vqvae).resolve(), models_dir, version, sha256, vqvae_sha256)
    return _register(engine, folder, "prima-checkpoint", promote)


def _install_bundle(source: Path, models_dir: Path) -> Path:
    from models.bundle import BundleError, map_bundle

    try:
        version = map_bundle(source).version  # checksums against the manifest, architecture
    except BundleError as error:
        raise InstallError(str(error)) from None
    if source.parent == models_dir:
        return source  # installed already (e.g. a bundle the nightly training wrote)
    target = models_dir / version
    if target.exists():
        raise InstallError(f"{target} exists already: version {version} is installed (see `triage models list`); "
                           "give the new bundle a version of its own")
    with tempfile.TemporaryDirectory(prefix=f".{version}.", dir=models_dir) as partial:
        copy = Path(partial) / "bundle"
        shutil.copytree(source, copy)
        try:
            map_bundle(copy)  # the copy, not just the source, must verify
        except BundleError as error:
            raise InstallError(f"the copy of {source} in {models_dir} does not verify: {error}") from None
        copy.rename(target)
    return target


def _install_prima_checkpoint(source: Path, vqvae: Path, models_dir: Path, version: str | None,
                              sha256: str | None, vqvae_sha256: str | None) -> Path:
    from models.bundle import BundleError, map_bundle
    from models.reference_checkpoint import ReferenceCheckpointError, export_reference_bundle

    if not vqvae.is_file():
        raise InstallError(f"--vqvae {vqvae} does not exist")
    _check_sha256(source, sha256, "Prima checkpoint")
    _check_sha256(vqvae, vqvae_sha256, "VQ-VAE checkpoint")
    version = version or PRIMA_CHECKPOINT_VERSION.get(source.name) or f"prima-{source.stem}"
    target = models_dir / version
    if target.exists():
        raise InstallError(f"{target} exists already: version {version} is installed; choose --version")
    with tempfile.TemporaryDirectory(prefix=f".{version}.", dir=models_dir) as partial:
        folder = Path(partial) / "bundle"
        try:
            export_reference_bundle(source, vqvae, folder, version=version)
            map_bundle(folder)
        except (ReferenceCheckpointError, BundleError) as error:
            raise InstallError(str(error)) from None
        folder.rename(target)
    return target


def _install_medimageinsight(source: Path, models_dir: Path, sha256: str | None, config: str) -> InstallOutcome:
    from models.medimageinsight import CONFIGS, CheckpointMismatch, check_checkpoint, read_safetensors_header

    try:
        check_checkpoint(read_safetensors_header(source), CONFIGS[config], where=str(source))
    except CheckpointMismatch as error:
        raise InstallError(str(error)) from None
    digest = _check_sha256(source, sha256 or PUBLISHED_SHA256.get(source.name), "MedImageInsight weights")
    target = models_dir / "medimageinsight" / digest[:16] / source.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(source, partial)
        _check_sha256(partial, digest, "the copy of")
        partial.rename(target)
    setting = f"slice_evidence.weights: {target}" + ("" if config == "full" else f"\nslice_evidence.config: {config}")
    return InstallOutcome("medimageinsight", target, setting=setting)


def _register(engine: Engine, folder: Path, kind: str, promote: bool | None) -> InstallOutcome:
    version = registry.register_bundle(engine, folder, notes=f"installed by `triage models install` ({kind})")
    serving = model_registry.serving_version(engine)
    if promote is None:
        promote = serving is None  # the first model: nothing would serve otherwise
    promoted = False
    if promote and (serving is None or serving.version != version.version):
        try:
            registry.promote(engine, version.version, actor="install", reason="installed by triage models install")
        except registry.RegistryError as error:
            raise InstallError(f"installed and registered {version.version}, but not promoted: {error}") from None
        promoted = True
    return InstallOutcome(kind, folder, version.version, promoted)
