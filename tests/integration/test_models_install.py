"""`triage models install`: official checkpoints and bundles, verified, into the registry; a worker is ready only
with a servable model."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from models.bundle import map_bundle, random_bundle, save_bundle, sha256_of
from sql.database import upgrade
from tests.support.processes import REPO, free_port, start_process, wait_for
from worker.cli import main
from worker.processes import stop_process_groups

PRIMA_FIXTURES = REPO / "tests" / "fixtures" / "prima_parity"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'triage.db'}" if request.param == "sqlite" else request.getfixturevalue(
        "postgres_url")
    upgrade(url)
    return url


def triage(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def registry(capsys: pytest.CaptureFixture, url: str) -> list[dict]:
    code, out = triage(capsys, "models", "list", "--json", "--url", url)
    assert code == 0
    return json.loads(out)


def write_bundle(folder: Path, version: str, seed: int = 0) -> Path:
    bundle = random_bundle("tiny", seed=seed, version=version)
    return save_bundle(folder, bundle.vqvae, bundle.prima, bundle.manifest)


@pytest.fixture(scope="module")
def official_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``primafullmodel107.pt`` at the published sizes (every tensor a stride-0 view: kilobytes, as in
    tests/unit/test_models_reference_checkpoint.py) and a full-size VQ-VAE state dict with random values (130 MB)."""
    from models.vqvae import build_vqvae

    folder = tmp_path_factory.mktemp("download")
    with gzip.open(PRIMA_FIXTURES / "fullmodel_fullsize_strided.pt.gz", "rb") as src, \
            open(folder / "primafullmodel107.pt", "wb") as dst:
        shutil.copyfileobj(src, dst)
    torch.manual_seed(0)
    torch.save(build_vqvae("full").state_dict(), folder / "vqvae_model_step16799.pth")
    return folder / "primafullmodel107.pt", folder / "vqvae_model_step16799.pth"


@pytest.mark.slow
def test_full_size_official_checkpoint_installs_through_the_safe_loader_and_serves(
        capsys, tmp_path: Path, postgres_url: str, official_files: tuple[Path, Path]) -> None:
    upgrade(postgres_url)
    prima, vqvae = official_files
    models_dir = tmp_path / "models"

    code, out = triage(capsys, "models", "install", str(prima), "--vqvae", str(vqvae), "--url", postgres_url,
                       "--models-dir", str(models_dir), "--sha256", sha256_of(prima))

    assert code == 0, out
    assert "installed prima-107" in out and "promoted" in out
    [version] = registry(capsys, postgres_url)
    assert version["version"] == "prima-107" and version["serving"] and version["config"] == "full"
    folder = Path(version["bundle_path"])
    assert folder == (models_dir / "prima-107").resolve()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["prima"]["sha256"] == sha256_of(prima)
    assert manifest["source"]["vqvae"]["sha256"] == sha256_of(vqvae)
    bundle = map_bundle(folder)  # every weight file matches its sha256 and the full architecture
    assert len(bundle.diagnosis_names) == 52 and bundle.manifest["prima_config"]["outer"]["dim"] == 1024


def test_a_checkpoint_that_does_not_match_its_sha256_is_refused_and_nothing_is_installed(
        capsys, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    upgrade(url)
    prima, vqvae = tmp_path / "primafullmodel107.pt", tmp_path / "vqvae.pth"
    shutil.copyfile(PRIMA_FIXTURES / "fullmodel_reduced.pt", prima)
    shutil.copyfile(PRIMA_FIXTURES / "vqvae_reduced.pt", vqvae)
    models_dir = tmp_path / "models"

    code, out = triage(capsys, "models", "install", str(prima), "--vqvae", str(vqvae), "--url", url,
                       "--models-dir", str(models_dir), "--sha256", "0" * 64)
    assert code == 1 and "sha256 is" in out and "download it again" in out
    assert list(models_dir.iterdir()) == [] and registry(capsys, url) == []

    code, out = triage(capsys, "models", "install", str(prima), "--url", url, "--models-dir", str(models_dir))
    assert code == 1 and "--vqvae" in out

    # The same files, unaltered: installed (the reduced reference checkpoint has the official layout).
    code, out = triage(capsys, "models", "install", str(prima), "--vqvae", str(vqvae), "--url", url,
                       "--models-dir", str(models_dir))
    assert code == 0, out
    assert [v["version"] for v in registry(capsys, url)] == ["prima-107"]


def test_bundle_installs_verified_into_the_models_folder_the_first_one_serving(
        capsys, tmp_path: Path, database_url: str) -> None:
    models_dir = tmp_path / "models"
    first = write_bundle(tmp_path / "download" / "first", "site-1")
    second = write_bundle(tmp_path / "download" / "second", "site-2", seed=1)

    code, out = triage(capsys, "models", "install", str(first), "--url", database_url, "--models-dir", str(models_dir))
    assert code == 0, out
    code, out = triage(capsys, "models", "install", str(second), "--url", database_url,
                       "--models-dir", str(models_dir))
    assert code == 0, out
    assert "candidate" in out

    versions = {v["version"]: v for v in registry(capsys, database_url)}
    assert versions["site-1"]["serving"] and not versions["site-2"]["serving"]
    assert versions["site-2"]["status"] == "candidate"
    for name in ("site-1", "site-2"):
        assert Path(versions[name]["bundle_path"]) == (models_dir / name).resolve()
        map_bundle(models_dir / name)
    shutil.rmtree(tmp_path / "download")  # the registry points at the installed copies, not the download
    map_bundle(models_dir / "site-1")


def test_a_corrupt_bundle_is_refused_naming_the_file_and_nothing_is_installed(
        capsys, tmp_path: Path, database_url: str) -> None:
    models_dir = tmp_path / "models"
    bundle = write_bundle(tmp_path / "download", "broken")
    weights = bytearray((bundle / "prima.pt").read_bytes())
    weights[-100] ^= 0xFF
    (bundle / "prima.pt").write_bytes(bytes(weights))

    code, out = triage(capsys, "models", "install", str(bundle), "--url", database_url,
                       "--models-dir", str(models_dir))

    assert code == 1 and "sha256 of prima.pt" in out
    assert list(models_dir.iterdir()) == [] and registry(capsys, database_url) == []


def test_medimageinsight_weights_are_checked_and_copied_and_the_setting_printed(capsys, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from models.medimageinsight import TINY, MedImageInsight, official_state_dict
    from models.slice_embedder import load_slice_model

    url = f"sqlite:///{tmp_path / 'triage.db'}"
    upgrade(url)
    torch.manual_seed(0)
    weights = tmp_path / "mi2-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in official_state_dict(MedImageInsight(TINY)).items()}, str(weights))
    models_dir = tmp_path / "models"

    code, out = triage(capsys, "models", "install", str(weights), "--slice-config", "tiny", "--url", url,
                       "--models-dir", str(models_dir))

    assert code == 0, out
    installed = next((models_dir / "medimageinsight").rglob("mi2-tiny.safetensors"))
    assert f"slice_evidence.weights: {installed}" in out
    assert sha256_of(installed) == sha256_of(weights)
    load_slice_model(installed, "tiny")
    assert registry(capsys, url) == []  # slice-evidence weights are configured, not registry versions

    # Under the official file name the published digest is required; these random weights do not have it.
    official_name = tmp_path / "medimageinsigt-v1.0.0.pt"
    shutil.copyfile(weights, official_name)
    code, out = triage(capsys, "models", "install", str(official_name), "--slice-config", "tiny", "--url", url,
                       "--models-dir", str(models_dir))
    assert code == 1 and "5eeda63b" in out

    # A file that does not fit the network is refused with the reason.
    code, out = triage(capsys, "models", "install", str(weights), "--url", url, "--models-dir", str(models_dir))
    assert code == 1 and "does not fit MedImageInsight 'full'" in out


def _readyz(port: int) -> tuple[int, dict] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return None


@pytest.mark.slow
def test_worker_is_not_ready_without_a_model_and_ready_once_one_is_installed(
        tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    upgrade(postgres_url)
    port = free_port()
    config = {"var_dir": str(tmp_path / "var"), "database": {"url": postgres_url}, "broker": {"url": redis_url},
              "model": {"bundle": "", "device": "cpu"}, "slice_evidence": {"enabled": False}}
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "TRIAGE_CONFIG": str(tmp_path / "triage.yaml")}
    log = tmp_path / "worker.log"
    worker = start_process([sys.executable, "-m", "worker.cli", "worker", "--hostname", "ready@localhost",
                               "--metrics-port", str(port)], cwd=tmp_path, env=env, stdout=log.open("wb"),
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def answered():
            assert worker.poll() is None, log.read_text(errors="replace")[-5000:]
            return _readyz(port)

        status, body = wait_for(answered, 120, what="the worker's /readyz")
        assert status == 503 and body["ready"] is False
        assert body["checks"]["database"] == "ok" and body["checks"]["broker"] == "ok"
        assert body["checks"]["model"].startswith("failing: ModelNotReady")
        assert "triage models install" in body["checks"]["model"]

        bundle = write_bundle(tmp_path / "download", "site-1")
        installed = subprocess.run([sys.executable, "-m", "worker.cli", "models", "install", str(bundle)],
                                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert installed.returncode == 0, installed.stdout + installed.stderr

        status, body = _readyz(port)
        assert (status, body["ready"], body["checks"]["model"]) == (200, True, "ok")
    finally:
        stop_process_groups(worker)
