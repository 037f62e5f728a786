"""Child processes that die with the service, and are found again if they did not.

A child is started from one long-lived thread (:class:`Spawner`) in a session (process group) of its own, with a
parent-death signal (Linux ``PR_SET_PDEATHSIG``): if the service is killed, even with SIGKILL, the kernel kills
the child too. The signal fires when the *thread* that forked the child ends, which is why children are not
started from short-lived per-connection threads. For what may still survive (another kernel, a child forked in
the instant its parent died), a child is identified later by its pid and its start time in ``/proc`` (a pid
alone may have been reused by an unrelated process), and by its command line.

The signal is asked for by util-linux's ``setpriv --pdeathsig`` where it is installed (Debian: always), which
execs the child in place: a ``preexec_fn`` would force a full ``fork()`` of the service (about 50 ms for a
300 MB process here, against 6 ms through setpriv), and children are started one at a time. Without setpriv a
``preexec_fn`` does it, and also catches the parent dying before the request (setpriv cannot).
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import Future
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # resolved here: the forked child must not load anything


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the forked child before exec: ask for SIGKILL when the forking thread ends."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request was made: nobody would kill us
        os._exit(1)


class Spawner:
    """Starts child processes from one thread of its own, which lives until :meth:`stop`.

    Stopping the spawner kills (by the parent-death signal) every child it started that is still running, so it
    is stopped last, after its children were waited for.
    """

    def __init__(self, name: str, setpriv: str | None = shutil.which("setpriv")) -> None:
        self.setpriv = setpriv
        self._requests: queue.Queue[tuple[list[str], dict, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def spawn(self, args: list[str], **popen_kwargs) -> subprocess.Popen:
        """``subprocess.Popen(args, **popen_kwargs)`` in a new session, killed when the service dies."""
        if not self._thread.is_alive():
            raise OSError("the spawner is not running")
        done: Future = Future()
        self._requests.put((args, popen_kwargs, done))
        return done.result()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._requests.put(None)
            self._thread.join(10)
        while True:  # a request that came after the end: refused, not left waiting for ever
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request[2].set_exception(OSError("the spawner has stopped"))

    def _run(self) -> None:
        parent = os.getpid()
        while (request := self._requests.get()) is not None:
            args, popen_kwargs, done = request
            try:
                if self.setpriv is not None:
                    process = subprocess.Popen([self.setpriv, "--pdeathsig", "KILL", "--", *args],
                                               start_new_session=True, **popen_kwargs)
                else:
                    process = subprocess.Popen(args, start_new_session=True,
                                               preexec_fn=lambda: _die_with_parent(parent), **popen_kwargs)
                done.set_result(process)
            except BaseException as exc:  # handed to the caller, which decides
                done.set_exception(exc)


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, from ``/proc/<pid>/stat``); None if it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces and ')': the fields after the last ')' are fixed.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # ended, not yet reaped
        return None
    return int(fields[19])


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def storescp_output_folder(pid: int) -> Path | None:
    """The ``-od`` folder of a running storescp, or None if ``pid`` is not a storescp."""
    argv = command_line(pid)
    if not argv or Path(argv[0]).name != "storescp" or "-od" not in argv[:-1]:
        return None
    return Path(argv[argv.index("-od") + 1])


def storescp_serving(pid: int, started: int | None, folder: Path) -> bool:
    """Whether ``pid`` is still the storescp (started at ``started``) that writes into ``folder``."""
    return (started is not None and start_time(pid) == started
            and storescp_output_folder(pid) == Path(folder))


def storescps_under(spool_dir: Path) -> list[int]:
    """Every running storescp whose output folder is inside ``spool_dir``."""
    spool_dir = Path(spool_dir)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            folder = storescp_output_folder(int(entry.name))
            if folder is not None and folder.parent == spool_dir and start_time(int(entry.name)) is not None:
                found.append(int(entry.name))
    return found


def kill_group(pid: int, wait_s: float = 5.0) -> None:
    """SIGKILL ``pid`` and its process group (when it leads one), and wait until it has ended."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
