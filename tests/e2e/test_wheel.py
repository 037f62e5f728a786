"""The package as a hospital installs it: a wheel built from the checkout, installed without ``-e`` into a fresh
environment outside the checkout, run from a folder outside the checkout.

The fresh environment reuses the test environment's dependencies (torch and the rest are gigabytes) through a
``.pth`` line naming that environment's site-packages. A folder added that way is not itself scanned for ``.pth``
files, so the checkout's editable-install hook stays inactive: ``worker``, ``sql`` and the rest can only come from
the wheel, and a test checks that they do.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from tests.support.processes import REPO, free_port, start_process, wait_for

PACKAGES = ("pacs_bridge", "worker", "models", "train", "sql")
#: Folders of the checkout that never belong in a wheel (build outputs, environments, run-time state).
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", "test-output", "*.whl")

pytestmark = pytest.mark.slow


class Installed:
    """A fresh virtual environment with the wheel installed, and a working folder outside the checkout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.venv = root / "venv"
        self.cwd = root / "site"
        self.cwd.mkdir()
        self.site_packages = Path(subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True).stdout.strip())
        # No PYTHONPATH: the checkout must not be importable. TRIAGE_CONFIG unset: defaults, relative to cwd.
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRIAGE_CONFIG")
                    and not k.startswith("TRIAGE_")}

    @property
    def triage(self) -> str:
        return str(self.venv / "bin" / "triage")

    def run(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([self.triage, *args], cwd=self.cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def python(self, code: str) -> str:
        result = subprocess.run([str(self.venv / "bin" / "python"), "-c", code], cwd=self.cwd, env=self.env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: building in the checkout would leave build/ and *.egg-info there, and a stale build/lib
    # could supply files the package configuration forgets.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES, symlinks=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    wheel = next((root / "dist").glob("triage_worker-*.whl"))

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    installed = Installed(root)
    (installed.site_packages / "triage_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "venv" / "bin" / "python"), "install",
                    "--no-deps", "-q", str(wheel)], check=True, capture_output=True, timeout=600)
    return installed


def test_the_packages_are_imported_from_the_installed_wheel_not_the_checkout(installed: Installed) -> None:
    places = json.loads(installed.python(
        f"import importlib, json; print(json.dumps({{p: importlib.import_module(p).__file__ for p in {PACKAGES!r}}}))"
    ))
    for package, path in places.items():
        assert Path(path).is_relative_to(installed.site_packages), f"{package} imported from {path}"


def test_every_file_of_the_packages_in_the_checkout_ships_in_the_wheel(installed: Installed) -> None:
    # Data files (migrations, views, worklist page, tables, labels) are read at run time from beside the code.
    expected = {
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc" and path.name != "README.md"
    }
    missing = sorted(name for name in expected if not (installed.site_packages / name).is_file())
    assert not missing, f"not in the installed wheel: {missing}"
    assert (installed.site_packages / "sql" / "migrations" / "versions").is_dir()
    licence = next(installed.site_packages.glob("triage_worker-*.dist-info")) / "licenses" / "LICENSE"
    assert "Apache License" in licence.read_text()


def test_db_upgrade_from_the_installed_wheel_on_sqlite_and_postgres(installed: Installed, postgres_url: str) -> None:
    sqlite = installed.run("db", "upgrade")
    assert sqlite.returncode == 0, sqlite.stderr[-3000:]
    assert "database at revision" in sqlite.stdout
    assert (installed.cwd / "var" / "triage.db").is_file()  # the default database, relative to the working folder

    postgres = installed.run("db", "upgrade", "--url", postgres_url)
    assert postgres.returncode == 0, postgres.stderr[-3000:]
    assert "database at revision" in postgres.stdout
    from sqlalchemy import create_engine, inspect

    engine = create_engine(postgres_url)
    try:
        views = set(inspect(engine).get_view_names())
    finally:
        engine.dispose()
    assert "v_study_turnaround" in views  # the views' SQL files came from the wheel too


def test_models_list_from_the_installed_wheel(installed: Installed, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    assert installed.run("db", "upgrade", "--url", url).returncode == 0
    listed = installed.run("models", "list", "--json", "--url", url)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert json.loads(listed.stdout) == []


def test_serve_from_the_installed_wheel_answers_c_echo_and_stops_on_sigterm(installed: Installed,
                                                                             postgres_url: str) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    port = free_port()
    log = installed.root / "serve.log"
    env = {**installed.env, "TRIAGE_DATABASE__URL": postgres_url, "TRIAGE_SCP__PORT": str(port),
           "TRIAGE_METRICS__SERVE_PORT": "0"}
    with log.open("wb") as out:
        process = start_process([installed.triage, "serve"], cwd=installed.cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: b"listening" in log.read_bytes() or process.poll() is not None, 120,
                 what="triage serve to listen")
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        association = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        assert association.is_established
        status = association.send_c_echo()
        association.release()
        assert status.Status == 0x0000
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, log.read_text(errors="replace")[-3000:]


def test_the_worklist_page_is_served_from_the_installed_wheel(installed: Installed, tmp_path: Path) -> None:
    port = free_port()
    url = f"sqlite:///{tmp_path / 'api.db'}"
    assert installed.run("db", "upgrade", "--url", url).returncode == 0
    log = installed.root / "api.log"
    env = {**installed.env, "TRIAGE_DATABASE__URL": url, "TRIAGE_API__PORT": str(port)}
    with log.open("wb") as out:
        process = start_process([installed.triage, "api"], cwd=installed.cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def page() -> str | None:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/worklist/", timeout=5) as response:
                return response.read().decode()
        except OSError:
            return None

    try:
        html = wait_for(page, 120, what="the worklist page")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/worklist/assets/worklist.js", timeout=5) as response:
            assert response.status == 200
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    assert "<html" in html.lower()
