"""Studies loaded (DICOM read, pixel decode, resample, reorient) in a pool of processes beside the worker.

Loading is Python and NumPy work that holds the GIL: threads of one process take turns (two studies on two
threads took 0.91x the time of one after the other), processes do not. The pool is started once per worker
process, from a forkserver (never a fork of a process holding torch's threads and the broker's sockets), and
hands back the volumes as NumPy arrays. ``worker.load_processes`` sizes it; -1 loads in the calling process.
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

log = logging.getLogger(__name__)


def pool_size(setting: int) -> int:
    """Processes for ``worker.load_processes``: 0 means one per core, -1 (or less) none (load in-process)."""
    if setting < 0:
        return 0
    return setting or (os.cpu_count() or 1)


class StudyLoader:
    """``load(paths by series)`` -> ``models.volume.load_study``'s (volumes, skipped), in a process of the pool."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                # The loader's imports once in the server, not in every child (numpy, pydicom and its handlers).
                context.set_forkserver_preload(["models.volume"])
                self._pool = concurrent.futures.ProcessPoolExecutor(self.processes, mp_context=context)
            return self._pool

    def load(self, paths_by_series: Mapping[str, Sequence[Path]]) -> tuple[list, dict[str, str]]:
        from models.volume import load_study

        paths = {uid: list(p) for uid, p in paths_by_series.items()}
        if self.processes <= 0:
            return load_study(paths)
        pool = self._executor()
        try:
            return pool.submit(load_study, paths).result()
        except BrokenProcessPool:
            # A loader process died (killed, out of memory): a fresh pool for the next study; this one fails.
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
