"""Stopping the services that commands and tests start as children, each in a process group of its own."""
from __future__ import annotations

import os
import signal
import subprocess


def stop_process_groups(*processes: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the group of every process still running, let each stop within ``grace_s``, then SIGKILL the rest.

    Each process must have been started with ``start_new_session=True``: its group holds what it started in turn
    (a Celery worker's pool, a service's storescp processes), and all of it goes.
    """
    for process in processes:
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # the group is gone already
        pass
