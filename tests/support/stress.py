"""Load for tests that must pass on a busy machine: one busy-loop process per core, at normal priority.

The processes are stopped when the ``with`` block ends, however it ends, and each also stops by itself as soon as
its parent is gone, so a test run that is killed outright leaves none behind.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

# Spins, looking up every few million steps whether its parent (the test process, whose pid it is given: it may
# be gone before this has started) is still there.
_BUSY_LOOP = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(2_000_000):
        pass
"""


@contextlib.contextmanager
def cpu_stress(processes: int | None = None) -> Iterator[list[subprocess.Popen]]:
    """Keep ``processes`` (default: every core) busy for the duration of the block."""
    hogs: list[subprocess.Popen] = []
    try:
        for _ in range(processes or os.cpu_count() or 1):
            hogs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(os.getpid())],
                                         stdin=subprocess.DEVNULL))
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait(10)


@pytest.fixture(name="cpu_stress")
def cpu_stress_fixture() -> Iterator[list[subprocess.Popen]]:
    """Every core kept busy by another process while the test runs (stopped even when the test fails)."""
    with cpu_stress() as hogs:
        yield hogs
