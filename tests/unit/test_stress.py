"""The cpu_stress fixture: every core busy while a test runs, and nothing left running afterwards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO, wait_for
from tests.support.stress import cpu_stress


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_every_core_is_kept_busy_and_the_load_stops_even_when_the_test_fails():
    with pytest.raises(RuntimeError):
        with cpu_stress() as hogs:
            assert len(hogs) == os.cpu_count()
            wait_for(lambda: all(_cpu_seconds(h.pid) > 0.3 for h in hogs), 30, what="the hogs to burn CPU")
            raise RuntimeError("the test failed")
    assert all(h.poll() is not None for h in hogs)


def test_the_load_stops_by_itself_when_the_test_process_is_killed():
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tests.support.stress import cpu_stress\n"
              "with cpu_stress(2) as hogs:\n    print(*(h.pid for h in hogs), flush=True); time.sleep(600)\n")
    runner = subprocess.Popen([sys.executable, "-c", script, str(REPO)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in runner.stdout.readline().split()]
    runner.send_signal(signal.SIGKILL)
    runner.wait(10)
    try:
        wait_for(lambda: all(_gone(pid) for pid in pids), 30, what="the orphaned hogs to stop")
    finally:
        for pid in pids:  # only if the assertion failed: never leave them spinning
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
