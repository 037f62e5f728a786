"""A value from the network cannot forge a line in the service's text log: a real `triage serve`, a real peer."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml
from pydicom.uid import generate_uid

from tests.support.dicom_factory import mr_slice
from tests.support.processes import REPO, free_port, start_process, wait_for
from tests.support.raw_dicom import RawStoreSCU, _encode

FORGED = "2026-01-01 00:00:00,000 ERROR a: FORGED deleted"  # after "1.2.3" and a newline: 64 characters at most


@pytest.mark.slow
def test_a_newline_in_a_command_uid_does_not_forge_a_log_line(tmp_path):
    port = free_port()
    config = tmp_path / "triage.yaml"
    config.write_text(yaml.safe_dump({"var_dir": str(tmp_path / "var"), "metrics": {"serve_port": 0},
                                      "scp": {"port": port, "allowed_calling_aets": ["PYSCU"]}}))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        serve = start_process([sys.executable, "-m", "worker.cli", "serve"], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "TRIAGE_CONFIG": str(config)})
    try:
        wait_for(lambda: b"listening" in log_path.read_bytes() or serve.poll() is not None, 90,
                 what="triage serve to listen")
        assert serve.poll() is None, log_path.read_text()
        scu = RawStoreSCU(port)
        try:
            # The DIMSE command's Affected SOP Instance UID carries a line break and a fake record; the dataset's
            # own UID differs, so the receiver rejects it and logs the command's value in its reason.
            status = scu.send(_encode(mr_slice(generate_uid(), generate_uid(), 0)),
                              sop_instance_uid=f"1.2.3\n{FORGED}")
        finally:
            scu.close()
        assert status >= 0xA000
        wait_for(lambda: b"rejected instance" in log_path.read_bytes(), 30, what="the rejection to be logged")
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(30)
    lines = log_path.read_text().splitlines()
    assert not any(line.startswith(FORGED[:23]) for line in lines), "a forged record starts a line"
    (rejected,) = [line for line in lines if "rejected instance" in line]
    assert "1.2.3\\n2026-01-01 00:00:00,000 ERROR" in rejected  # the value is still there, escaped
