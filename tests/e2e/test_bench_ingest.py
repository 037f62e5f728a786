"""`triage bench ingest` runs end to end and prints the figures the issue asks for (the values are for the bench)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.support.processes import REPO

pytestmark = [pytest.mark.needs_dcmtk, pytest.mark.needs_orthanc]

KEYS = {"ours_images_per_s", "dcmtk_images_per_s", "orthanc_images_per_s", "ours_cpu_ms_per_image",
        "ratio_vs_orthanc", "ratio_vs_dcmtk", "ours_pynetdicom_images_per_s", "associations", "engine"}


@pytest.mark.skipif(shutil.which("storescp") is None or shutil.which("Orthanc") is None,
                    reason="dcmtk and Orthanc are needed (run ops/setup.sh)")
def test_bench_ingest_sends_to_every_receiver_and_ends_with_a_json_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "worker.cli", "bench", "ingest", "--images", "30",
                             "--repeats", "1", "--associations", "2", "--without-fsync"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert KEYS <= set(figures)
    assert figures["images"] == 30 and figures["associations"] == 2 and figures["engine"] == "dcmtk"
    for key in ("ours_images_per_s", "dcmtk_images_per_s", "orthanc_images_per_s", "ours_pynetdicom_images_per_s",
                "ours_without_fsync_images_per_s", "ours_pynetdicom_without_fsync_images_per_s"):
        assert figures[key] > 0, key
    assert figures["ratio_vs_orthanc"] == pytest.approx(
        figures["ours_images_per_s"] / figures["orthanc_images_per_s"], abs=0.01)
