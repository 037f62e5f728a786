"""What the intake tests share: a receiver running in the test process, phantom studies made once per session,
our own SR for a study, and dcmtk's storescu as the sender."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

import pydicom
import pytest
import yaml

from pacs_bridge.assembly import CompletionPolicy, StudyAssembler
from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.scp import ScpSettings
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from sql.schema import utcnow
from tests.support.processes import free_port
from worker.config import Settings, load_settings
from worker.service import make_receiver, routing_rules

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
_PHANTOM_DIR = Path(tempfile.mkdtemp(prefix="intake-phantoms-"))
atexit.register(shutil.rmtree, _PHANTOM_DIR, ignore_errors=True)


@lru_cache(maxsize=None)
def phantom(lesion: str, seed: int, series: tuple[str, ...] | None = None):
    """A phantom brain-MR study, written once per test session (the same arguments give the same files)."""
    from train.phantoms import write_phantom_study

    return write_phantom_study(_PHANTOM_DIR / f"{lesion}-{seed}-{len(series or ())}", lesion, seed=seed,
                               series=list(series) if series else None)


def write_config(folder: Path, **sections) -> Path:
    """A triage.yaml in ``folder`` (var_dir inside it) with the given sections; returns its path."""
    config = {"var_dir": str(folder / "var"), **sections}
    path = folder / "triage.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def storescu(port: int, *paths: Path, aet: str = "MODALITY", called: str = "TRIAGE") -> None:
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk is not installed (run ops/setup.sh)")
    result = subprocess.run(["storescu", "-R", "-aet", aet, "-aec", called, "+sd", "+r", "127.0.0.1", str(port),
                             *map(str, paths)], capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
    assert result.returncode == 0, result.stderr


@dataclass
class Receiver:
    """Our SCP, its bookkeeper and the study assembler, in this process, on the configuration's database."""

    settings: Settings
    config_path: Path
    dispatched: list[tuple[int, str, str]] = field(default_factory=list)
    forwarded: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        upgrade(self.settings.database_url)
        self.engine = make_engine(self.settings.database_url)
        self.store = InstanceStore(self.settings.incoming_dir, self.settings.quarantine_dir)
        self.bookkeeper = Bookkeeper(self.engine, flush_interval_s=0.05)
        scp = self.settings.scp
        self.scp = make_receiver(ScpSettings(engine=scp.engine, ae_title=scp.ae_title,
                                             port=int(scp.port) or free_port()),
                                 self.store, self.bookkeeper, spool_dir=self.settings.var_dir / "spool")
        assembly = self.settings.assembly
        self.assembler = StudyAssembler(
            self.engine, lambda run_id, pipeline, lane: self.dispatched.append((run_id, pipeline, lane)),
            CompletionPolicy(float(assembly.quiet_period_s), float(assembly.max_wait_s),
                             float(assembly.expected_series_settle_s)),
            active_studies=self.scp.active.current, rules=routing_rules(self.settings),
            forward=self.forwarded.append, store_root=self.settings.incoming_dir,
        )

    def start(self) -> "Receiver":
        self.bookkeeper.start()
        self.scp.start()
        return self

    def stop(self) -> None:
        self.scp.stop()
        self.bookkeeper.stop()
        self.engine.dispose()

    def send(self, *paths: Path, aet: str = "MODALITY", called: str = "TRIAGE") -> None:
        storescu(self.scp.port, *paths, aet=aet, called=called)
        if hasattr(self.scp, "wait_idle"):  # the dcmtk engine: its intake runs after storescp has answered
            assert self.scp.wait_idle()
        assert self.bookkeeper.wait_idle()

    def complete(self, after_s: float = 3600.0) -> list[int]:
        """Run the completion check as if ``after_s`` seconds had passed (every quiet period over)."""
        return self.assembler.check_once(utcnow() + timedelta(seconds=after_s))


def receiver_for(tmp_path: Path, **sections) -> Receiver:
    sections.setdefault("scp", {})
    sections["scp"] = {"port": free_port(), **sections["scp"]}
    config_path = write_config(tmp_path, **sections)
    return Receiver(load_settings(config_path, environ={}), config_path)


def our_sr(study_files: list[Path], folder: Path, priority: str = "stat") -> Path:
    """An SR as our worker writes it for the study of ``study_files`` (what a PACS may route back to us)."""
    from models.labels import DIAGNOSIS_NAMES
    from pacs_bridge.results import Finding, TriageResult
    from pacs_bridge.sr import build_sr

    evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in study_files]
    label = next(name for name in DIAGNOSIS_NAMES if "subdural" in name)
    result = TriageResult(study_instance_uid=str(evidence[0].StudyInstanceUID), priority=priority,
                          findings=(Finding(label, 0.9, 0.5),), referrals=(), model_name="prima",
                          model_version="test")
    sr = build_sr(result, evidence, device_uid="2.25.1234567")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path
