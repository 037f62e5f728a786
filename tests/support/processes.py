"""Ports, polling waits and child processes for the tests.

Every server a fixture starts goes through `start_process`: it runs in a process group of its own and is
recorded, so that `stop_process` ends the whole group (a server's own children too) and `stop_all` ends
whatever is left when the session ends, when pytest exits (atexit) or when pytest is sent SIGTERM/SIGHUP — a
test that fails, or one that pytest-timeout interrupts, leaves no Orthanc, storescp or API process behind."""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[2]

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1  # prctl(2)
#: Process groups started by `start_process` and not yet stopped (pid -> the Popen).
_RUNNING: dict[int, subprocess.Popen] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], T], timeout: float, what: str = "condition", interval: float = 0.2) -> T:
    """Poll `condition` until it returns something true and return that; `what` names it in the TimeoutError.

    Timeouts are deadlines, not delays: a generous one costs nothing when the condition comes true early, and
    the test machine is small and shared, so callers should give plenty.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when pytest dies, even by SIGKILL, which no handler of ours sees.

    Linux sends it when the *thread* that started the child ends: start servers from the test's own thread."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start_process(args: list[str], **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen` in a new process group, recorded so that it is stopped even if the test is not."""
    popen_kwargs["start_new_session"] = True
    if sys.platform == "linux" and "preexec_fn" not in popen_kwargs:
        popen_kwargs["preexec_fn"] = _die_with_parent
    process = subprocess.Popen(args, **popen_kwargs)
    _RUNNING[process.pid] = process
    return process


def stop_process(process: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM to the process's group, then SIGKILL to the group if it has not exited within `grace_s`."""
    if process is None:
        return
    _RUNNING.pop(process.pid, None)
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Also when the leader is gone: children it left in its group (a server's workers) still go.
    _signal_group(process, signal.SIGKILL)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:  # pragma: no cover - one that survives SIGKILL is the kernel's business
        pass


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    """Stop every process group `start_process` started that is still recorded; quick, as it runs at exit."""
    for process in list(_RUNNING.values()):
        stop_process(process, grace_s=3.0)


def _stop_all_then_die(signum: int, _frame) -> None:
    stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_reaper() -> None:
    """Run `stop_all` at exit and on SIGTERM/SIGHUP (where by default pytest dies, cleaning nothing)."""
    atexit.register(stop_all)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _stop_all_then_die)
