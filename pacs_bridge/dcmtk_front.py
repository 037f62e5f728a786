"""A C-STORE receiver with dcmtk's ``storescp`` on the wire, for sites that send more than pynetdicom can take.

pynetdicom receives about 150 images/s on one association here (polling reactors, PDUs parsed in Python);
dcmtk's storescp about 1500 on the same machine. This engine keeps the decisions in Python and gives dcmtk only
the bytes:

1. We accept each TCP connection and read its A-ASSOCIATE-RQ without consuming it (``MSG_PEEK``), decoded by
   pynetdicom. The calling and called AE titles and the peer address are checked against the same allow-list and
   AE-host bindings as the pynetdicom SCP, and back-pressure (intake backlog, free disk, a stalled database) and
   the association limit are applied here; a refused association is answered with an A-ASSOCIATE-RJ. The limit
   holds under concurrent requests: a slot is taken under a lock when the request is checked, and given back when
   its storescp ends (or could not be started).
2. An accepted connection becomes the stdin/stdout of ``storescp --inetd`` (one process per association, as
   inetd would run it), which negotiates and writes each object as it came (``+B``) into a spool folder of that
   association, under a name of its own making (``+uf``: never one taken from the sender's UIDs, so a hostile
   UID cannot place a file anywhere). In this mode storescp writes the file meta from the C-STORE request: its
   Media Storage SOP Class/Instance UIDs are the request's Affected SOP Class/Instance UIDs.
3. The intake sees each file closed (inotify ``IN_CLOSE_WRITE``), checks it as the pynetdicom SCP checks a
   C-STORE (:mod:`pacs_bridge.intake`, with the request's UIDs from that file meta: a request that disagrees with
   its dataset is quarantined with status A900 and the reason), moves it into the store and queues its
   bookkeeping with the association's AE titles and peer. What fails the checks is quarantined with its reason.

storescp children die with the service (:mod:`pacs_bridge.child_processes`): each runs in a process group of its
own with a parent-death signal (SIGKILL when the service dies, even by SIGKILL), started from one long-lived
thread (the signal follows the forking thread). Its pid and start time are kept in the association's sidecar;
the next start kills any storescp still writing into the spool before taking in its folder, and ``stop()`` kills
what still runs after ``scp.network_timeout_s``. The spool is searched every few seconds (``RESCAN_INTERVAL_S``)
for folders no running association owns, so what a storescp wrote before a crash is taken in at the next start
and nothing waits for a later, unrelated restart. storescp does not fsync: an object it answered Success for is
safe from a killed service, and made durable by the store when it is taken in (a moment later).

Why not storescp's ``--fork`` with ``--exec-on-reception "... #a"`` (what mercure does)? dcmtk 3.6.7 pastes the
calling AE title into a ``/bin/sh -c`` command line unquoted: a sender calling itself ``$(touch x)`` runs
commands on the receiver (tried here). The AE titles never reach a shell in this design.

What differs from the pynetdicom engine: storescp answers Success for every object it could write, so an object
our checks refuse is quarantined after the sender was told it arrived (an event says so) instead of being
refused on the wire; back-pressure refuses new associations (rejected-transient, local limit exceeded) instead
of answering C-STOREs with A700; DICOM TLS is not offered (the association request must be readable before the
connection is handed on).
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom.filereader
from inotify_simple import INotify, flags
from pynetdicom.pdu import A_ASSOCIATE_RJ, A_ASSOCIATE_RQ

from pacs_bridge.bookkeeping import Bookkeeper, ReceivedInstance
from pacs_bridge.child_processes import Spawner, kill_group, start_time, storescp_serving, storescps_under
from pacs_bridge.dicom_tls import PeerBindings
from pacs_bridge.intake import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    RejectedInstance,
    check_received,
)
from pacs_bridge.scp import STORAGE_SOP_CLASSES, ActiveStudies, BackPressure, ScpSettings
from pacs_bridge.storage import InstanceStore

log = logging.getLogger(__name__)

#: An A-ASSOCIATE-RQ larger than this is not read (real ones are a few KB: 128 presentation contexts at most).
MAX_ASSOCIATE_RQ_BYTES = 64 * 1024
#: The sidecar that tells a restarted intake whose files a spool folder holds.
ASSOCIATION_FILE = "association.json"
#: How often the spool is searched for folders no running association owns (left by a previous run, or by an
#: association whose files could not be stored at the time).
RESCAN_INTERVAL_S = 2.0
#: A folder whose files could not be stored (the store's disk) is tried again after this long, not at every rescan.
RETRY_STORE_AFTER_S = 60.0

# A-ASSOCIATE-RJ result, source and reason (PS3.8 9.3.4).
_REJECTED_PERMANENT, _REJECTED_TRANSIENT = 0x01, 0x02
_SOURCE_USER, _SOURCE_PROVIDER_PRESENTATION = 0x01, 0x03
_REASON_CALLING_AE_NOT_RECOGNISED, _REASON_LOCAL_LIMIT_EXCEEDED = 0x03, 0x02


@dataclass
class Association:
    """One accepted association: who sent it and the spool folder its storescp writes into."""

    number: int
    calling_aet: str
    called_aet: str
    peer_address: str
    folder: Path
    process: subprocess.Popen | None = None
    watch: int | None = None
    finishing: bool = False
    #: Whether it still counts against scp.max_associations (until its storescp has ended).
    holds_slot: bool = False


class DcmtkFront:
    """The receiver engine ``dcmtk``: same interface and counts as :class:`pacs_bridge.scp.StorageSCP`."""

    def __init__(self, settings: ScpSettings, store: InstanceStore, bookkeeper: Bookkeeper, spool_dir: Path,
                 storescp: str = "storescp") -> None:
        if settings.tls is not None:
            raise ValueError("scp.engine dcmtk does not offer DICOM TLS (the association request must be read "
                             "before the connection is handed to storescp): use scp.engine pynetdicom for TLS")
        executable = shutil.which(storescp)
        if executable is None:
            raise ValueError(f"scp.engine dcmtk needs dcmtk's {storescp} (Debian package dcmtk; ops/setup.sh)")
        self.settings = settings
        self.store = store
        self.bookkeeper = bookkeeper
        self.spool_dir = Path(spool_dir).resolve()  # absolute: storescp's -od is compared with it after a crash
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.storescp = executable
        self.active = ActiveStudies(written=lambda: bookkeeper.written, added=lambda: bookkeeper.added)
        self.bindings = PeerBindings(settings.ae_hosts)
        self.allowed = set(settings.allowed_calling_aets) | set(self.bindings.ae_titles)
        # Counts for the metrics endpoint, as the pynetdicom SCP keeps them.
        self.received = 0
        self.deferred = 0  # associations refused by back-pressure (the sender keeps its images and retries)
        self.refused_associations = 0
        self.rejected_by_status: collections.Counter[int] = collections.Counter()
        self._associations: dict[int, Association] = {}
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._slots = 0  # associations accepted whose storescp has not ended (reserved when the request is checked)
        # Spool folders of this run are named <run>-<number>; the start time keeps a restarted service with the
        # same pid (pid 1 in a container) from taking a previous run's folder for its own.
        self._run = f"{os.getpid()}.{time.time_ns():x}"
        self._spawner = Spawner("dcmtk-front spawner")
        self._skipped: set[Path] = set()  # folders of another live storescp, warned about once
        self._next_rescan = 0.0
        self._retry_after: dict[Path, float] = {}  # left folders whose files could not be stored: when to retry
        self._inotify = INotify()
        self._by_watch: dict[int, Association] = {}
        self._finished: collections.deque[Association] = collections.deque()
        #: Rows of files taken in and not yet synced to disk (see :meth:`_record_taken_in`).
        self._taken_in: list[ReceivedInstance] = []
        #: Batches of rows for the sync thread: the intake goes on checking files while a batch's sync waits on
        #: the disk.
        self._to_sync: queue.Queue[list[ReceivedInstance] | None] = queue.Queue()
        self._sync_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.back_pressure = BackPressure(settings, bookkeeper, self.spool_dir)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._sync_thread = threading.Thread(target=self._sync_loop, name="dcmtk-front sync", daemon=True)
        self._sync_thread.start()
        self._kill_leftovers()
        self._take_in_left_folders()
        self._spawner.start()
        self._listener = socket.create_server((self.settings.host, self.settings.port), backlog=64)
        self._listener.settimeout(0.5)
        self._stop.clear()
        self._threads = [threading.Thread(target=self._accept_loop, name="dcmtk-front accept", daemon=True),
                         threading.Thread(target=self._intake_loop, name="dcmtk-front intake", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("SCP %s (dcmtk storescp) listening on %s:%d", self.settings.ae_title, self.settings.host, self.port)

    @property
    def port(self) -> int:
        if self._listener is not None:
            return self._listener.getsockname()[1]
        return self.settings.port

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every association has ended and its files are taken in and recorded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = (bool(self._associations) or bool(self._finished) or self._rescan_due
                        or self._to_sync.unfinished_tasks > 0)
            if not busy:
                return self.bookkeeper.wait_idle(max(0.1, deadline - time.monotonic()))
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop listening, let running associations finish (up to the network timeout), take in their files.

        A storescp still running after that is killed with its process group; what it wrote is taken in.
        """
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        deadline = time.monotonic() + self.settings.network_timeout_s
        for association in list(self._associations.values()):
            if association.process is not None:
                try:
                    association.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("storescp %d for %s still running after %.0f s: killed", association.process.pid,
                                association.calling_aet, self.settings.network_timeout_s)
                    kill_group(association.process.pid)
                    association.process.wait()
        for thread in self._threads:
            thread.join(10)
        for association in list(self._associations.values()):  # what the intake thread did not get to
            self._finish(association)
        if self._sync_thread is not None:
            self._to_sync.put(None)
            self._sync_thread.join(60)
        self._spawner.stop()  # last: its end kills (parent-death signal) any child still running
        self._inotify.close()

    # -- the network side ------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                connection, peer = self._listener.accept()  # type: ignore[union-attr]
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            # Reading the association request may take up to the network timeout: not on the accepting thread.
            address, port = peer[0], peer[1]  # IPv6 peers come as 4-tuples
            threading.Thread(target=self._handle_connection, args=(connection, address),
                             name=f"dcmtk-front {address}:{port}", daemon=True).start()

    def _handle_connection(self, connection: socket.socket, address: str) -> None:
        reserved = False  # an association slot this thread holds until storescp has it
        try:
            request = self._peek_associate_rq(connection)
            if request is None:
                connection.close()
                return
            calling, called = request.calling_ae_title.strip(), request.called_ae_title.strip()
            refusal = self._refusal(calling, address)
            if refusal is not None:
                result, source, reason, why = refusal
                # Counted and recorded before the rejection goes out: whoever sees the rejection sees the count.
                if result == _REJECTED_TRANSIENT:
                    self.deferred += 1
                    if self.deferred % 100 == 1:
                        log.warning("refusing associations for now (the sender retries): %s", why)
                else:
                    self.refused_associations += 1
                    log.warning("refused association: %s", why)
                    self.bookkeeper.event("association_refused", why,
                                          detail={"calling_aet": calling, "peer": address})
                self._reject(connection, result, source, reason)
                return
            reserved = True
            reserved = not self._hand_to_storescp(connection, calling, called, address)
        except Exception:  # one broken connection never stops the receiver
            log.exception("connection from %s not handled", address)
            connection.close()
        finally:
            if reserved:
                with self._lock:
                    self._slots -= 1

    def _peek_associate_rq(self, connection: socket.socket) -> A_ASSOCIATE_RQ | None:
        """The peer's A-ASSOCIATE-RQ, left unread in the socket for storescp; None if it is not one."""
        # A peer that sends no association request soon is dropped: it must not hold a thread for the network timeout.
        connection.settimeout(self.settings.association_request_timeout_s)
        try:
            head = connection.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
            if len(head) < 6 or head[0] != 0x01:
                return None
            length = int.from_bytes(head[2:6], "big")
            if length > MAX_ASSOCIATE_RQ_BYTES:
                log.warning("association request of %d bytes refused (more than %d)", length, MAX_ASSOCIATE_RQ_BYTES)
                return None
            pdu = connection.recv(6 + length, socket.MSG_PEEK | socket.MSG_WAITALL)
        except OSError:
            return None
        if len(pdu) < 6 + length:
            return None
        request = A_ASSOCIATE_RQ()
        try:
            request.decode(pdu)
        except Exception:
            return None
        return request

    def _refusal(self, calling: str, address: str) -> tuple[int, int, int, str] | None:
        """Why the association is refused, or None: then an association slot is reserved for it."""
        if (self.allowed and calling not in self.allowed) or not self.bindings.permits(calling, address):
            return (_REJECTED_PERMANENT, _SOURCE_USER, _REASON_CALLING_AE_NOT_RECOGNISED,
                    f"calling AE title {calling} is not allowed from {address}")
        busy = self.back_pressure.reason() or self._reserve_slot()
        if busy is not None:
            return _REJECTED_TRANSIENT, _SOURCE_PROVIDER_PRESENTATION, _REASON_LOCAL_LIMIT_EXCEEDED, busy
        return None

    def _reserve_slot(self) -> str | None:
        # Checked and taken in one step: requests checked at the same moment cannot all see a free slot.
        with self._lock:
            if self._slots >= self.settings.max_associations:
                return f"{self._slots} associations running (scp.max_associations {self.settings.max_associations})"
            self._slots += 1
        return None

    def _release_slot(self, association: Association) -> None:
        with self._lock:
            if association.holds_slot:
                association.holds_slot = False
                self._slots -= 1

    @staticmethod
    def _reject(connection: socket.socket, result: int, source: int, reason: int) -> None:
        rejection = A_ASSOCIATE_RJ()
        rejection.result, rejection.source, rejection.reason_diagnostic = result, source, reason
        try:
            # Read the request first: closing a socket with unread data resets it, and the peer might never see
            # the rejection.
            length = int.from_bytes(connection.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)[2:6], "big")
            connection.recv(6 + length, socket.MSG_WAITALL)
            connection.sendall(rejection.encode())
            connection.shutdown(socket.SHUT_WR)
            connection.settimeout(2.0)
            connection.recv(1)  # the peer closes after reading the rejection
        except OSError:
            pass
        finally:
            connection.close()

    def _hand_to_storescp(self, connection: socket.socket, calling: str, called: str, address: str) -> bool:
        """Start storescp on the connection; True once it runs and holds the caller's association slot."""
        number = next(self._numbers)
        folder = self.spool_dir / f"{self._run}-{number}"
        association = Association(number, calling, called, address, folder)
        with self._lock:  # listed before the folder exists: the spool rescan never takes it for a left one
            self._associations[number] = association
        try:
            folder.mkdir()
            sender = {"calling_aet": calling, "called_aet": called, "peer_address": address}
            _write_sidecar(folder, sender)
            with self._lock:
                association.watch = self._inotify.add_watch(folder, flags.CLOSE_WRITE)
                self._by_watch[association.watch] = association
            connection.settimeout(None)
            with (folder.parent / f"{folder.name}.log").open("wb") as log_file:
                association.process = self._run_storescp(folder, connection, log_file)
        except OSError:  # not started (no processes, memory or disk left): the association is over, unserved
            with self._lock:
                self._finished.append(association)
            raise
        association.holds_slot = True
        connection.close()  # storescp holds it now
        # Who runs it, for the next start if this service is killed: it must not go on writing unwatched.
        try:
            _write_sidecar(folder, {**sender, "pid": association.process.pid,
                                    "start_time": start_time(association.process.pid)})
        except OSError as exc:
            log.warning("could not record storescp %d in %s: %s", association.process.pid, folder, exc)
        threading.Thread(target=self._wait_for, args=(association,), name=f"storescp {number}", daemon=True).start()
        return True

    def _run_storescp(self, folder: Path, connection: socket.socket, log_file) -> subprocess.Popen:
        timeout = str(max(1, int(self.settings.network_timeout_s)))
        # +uf: file names of storescp's own making, never from the sender's UIDs. The C-STORE request's
        # Affected SOP Class/Instance UIDs are in the file meta storescp writes (bit-preserving mode builds it
        # from the request), and are compared with the dataset's at intake.
        return self._spawner.spawn(
            [self.storescp, "--inetd", "+B", "+uf", "+xa", "-dhl", "-aet", self.settings.ae_title,
             "-pdu", str(min(max(self.settings.max_pdu, 4096), 131072)), "-ta", timeout, "-ts", timeout,
             "-od", str(folder)],
            stdin=connection, stdout=connection, stderr=log_file, close_fds=True,
            # Debian's dcmtk leaves Nagle's algorithm on unless told: every response would wait ~40 ms.
            env={**os.environ, "TCP_NODELAY": "1"},
        )

    def _wait_for(self, association: Association) -> None:
        code = association.process.wait()  # type: ignore[union-attr]
        if code != 0:
            log.warning("storescp for %s from %s ended with %d (see %s.log)", association.calling_aet,
                        association.peer_address, code, association.folder)
        self._release_slot(association)
        with self._lock:
            self._finished.append(association)

    # -- the intake side -------------------------------------------------------------------------------------
    @property
    def _rescan_due(self) -> bool:
        return not self._stop.is_set() and time.monotonic() >= self._next_rescan

    def _intake_loop(self) -> None:
        while not (self._stop.is_set() and not self._running_or_finished()):
            for event in self._inotify.read(timeout=100):
                with self._lock:
                    association = self._by_watch.get(event.wd)
                if association is not None and _is_spooled_object(event.name):
                    self._take_in(association, association.folder / event.name)
            self._record_taken_in()
            while True:
                with self._lock:
                    if not self._finished:
                        break
                    association = self._finished.popleft()
                self._finish(association)
            if self._rescan_due:
                try:
                    self._take_in_left_folders()
                except OSError as exc:  # the spool's disk: tried again at the next rescan
                    log.error("could not search the spool %s: %s", self.spool_dir, exc)

    def _running_or_finished(self) -> bool:
        with self._lock:
            return bool(self._finished) or any(a.process is not None and a.process.poll() is None
                                               for a in self._associations.values())

    def _finish(self, association: Association) -> None:
        """After storescp has exited: take in what is left in the folder, remove it, close the association."""
        with self._lock:
            if association.finishing or association.number not in self._associations:
                return
            association.finishing = True  # stays listed (wait_idle sees it) until its files are booked
            if association.watch is not None:
                self._by_watch.pop(association.watch, None)
                try:
                    self._inotify.rm_watch(association.watch)
                except OSError:
                    pass
        self._take_in_folder(association)
        self.active.close(association.number)
        with self._lock:
            self._associations.pop(association.number, None)

    def _take_in_folder(self, association: Association) -> bool:
        """Take in every file in the association's folder; remove the folder (and an empty log) if none is left.

        False if files are left (they could not be stored now).
        """
        folder = association.folder
        try:
            for path in sorted(folder.iterdir()):
                if _is_spooled_object(path.name):
                    self._take_in(association, path)
            left = [p.name for p in folder.iterdir() if _is_spooled_object(p.name)]
        except FileNotFoundError:
            left = []
        finally:
            self._record_taken_in(wait=True)  # before the association closes: active until its rows are written
        if left:  # not storable now (the store's disk): kept, tried again at the next rescan, never deleted
            log.error("%d file(s) left in %s, tried again within %.0f s", len(left), folder, RETRY_STORE_AFTER_S)
            return False
        shutil.rmtree(folder, ignore_errors=True)
        log_path = folder.parent / f"{folder.name}.log"
        if log_path.exists() and log_path.stat().st_size == 0:
            log_path.unlink()
        return True

    def _take_in(self, association: Association, path: Path) -> None:
        """Check one file storescp wrote, then store and book it, or quarantine it with the reason."""
        context = {"calling_aet": association.calling_aet, "peer": association.peer_address,
                   "spool_file": path.name}
        data = b""
        try:
            size = path.stat().st_size
            limit = self.settings.max_object_bytes
            if limit and size > limit:
                raise RejectedInstance(f"object of {size} bytes exceeds scp.max_object_bytes ({limit})",
                                       STATUS_OUT_OF_RESOURCES)
            data = path.read_bytes()
            # storescp wrote the file meta from the C-STORE request: its UIDs are what the sender said it sends, and
            # the check compares them with the dataset's in the same parse (a second read of the meta cost a
            # fifth of the intake's time).
            header = check_received(data, request_in_meta=True)
            if header.sop_class_uid not in _ACCEPTED_SOP_CLASSES:
                raise RejectedInstance(f"SOP class {header.sop_class_uid} is not one this receiver takes",
                                       STATUS_CANNOT_UNDERSTAND)
            # Kept beside the series by the store: a row rebuilt by the reconciler routes as this one would.
            sender = {"calling_aet": association.calling_aet, "called_aet": association.called_aet,
                      "peer_address": association.peer_address, "source": "c-store"}
            # storescp answered Success before this runs, without an fsync; the store's sync before the rows are
            # handed on (:meth:`_record_taken_in`) makes a whole batch durable at once.
            stored = self.store.store(header.study_instance_uid, header.series_instance_uid,
                                      header.sop_instance_uid, data, source=path, sender=sender, durable=False)
        except FileNotFoundError:
            return  # taken in already (an inotify event for a file the finishing pass got to first)
        except RejectedInstance as exc:
            command = _request_uids(path)  # only for a refused object: name what the request said
            if command is not None:
                context["affected_sop_class_uid"], context["affected_sop_instance_uid"] = command[0], command[1][:128]
            self._quarantine(path, data, exc.reason, exc.status, context)
            return
        except OSError as exc:  # the store's disk: leave the file in the spool, it is taken in at the next start
            log.error("could not store %s: %s (left in the spool)", path, exc)
            return
        self.active.add(association.number, header.study_instance_uid)
        self._taken_in.append(ReceivedInstance(header=header, stored=stored, calling_aet=association.calling_aet,
                                               called_aet=association.called_aet,
                                               peer_address=association.peer_address))
        self.received += 1

    def _record_taken_in(self, wait: bool = False) -> None:
        """Hand the rows of the files taken in since the last call to the sync thread, which makes the files
        durable (one sync for the batch) and then queues the rows; ``wait``: until it has done so for every batch
        handed over (an association closing must not be idle before its rows are queued)."""
        if self._taken_in:
            batch, self._taken_in = self._taken_in, []
            if self._sync_thread is not None and self._sync_thread.is_alive():
                self._to_sync.put(batch)
            else:  # not started (or stopped): do it here
                self._sync_and_queue(batch)
        if wait and self._sync_thread is not None and self._sync_thread.is_alive():
            self._to_sync.join()

    def _sync_loop(self) -> None:
        while (batch := self._to_sync.get()) is not None:
            try:
                self._sync_and_queue(batch)
            finally:
                self._to_sync.task_done()
        self._to_sync.task_done()

    def _sync_and_queue(self, batch: list[ReceivedInstance]) -> None:
        try:
            self.store.sync()
        except OSError as exc:  # the rows are still worth having: the files are in the store
            log.error("could not sync the store: %s", exc)
        for row in batch:
            self.bookkeeper.add(row)

    def _quarantine(self, path: Path, data: bytes, reason: str, status: int, context: dict[str, str]) -> None:
        self.rejected_by_status[status] += 1
        kept = None
        try:
            kept = self.store.quarantine(data or path.read_bytes()[:65536], reason,
                                         {**context, "status": f"0x{status:04X}", "answered": "success (storescp)"})
            path.unlink(missing_ok=True)
        except OSError as exc:
            reason = f"{reason}; quarantine also failed: {exc} (left in the spool)"
        log.warning("quarantined object from %s: %s", context["calling_aet"], reason)
        self.bookkeeper.event("quarantine", reason, sop_instance_uid=context.get("affected_sop_instance_uid"),
                              detail={**context, "status": status, "path": str(kept) if kept else None})

    def _kill_leftovers(self) -> None:
        """Kill every storescp a previous run left writing into this spool (before its folder is taken in)."""
        for folder in (p for p in self.spool_dir.iterdir() if p.is_dir()):
            recorded = _read_sidecar(folder)
            pid, started = recorded.get("pid"), recorded.get("start_time")
            if isinstance(pid, int) and storescp_serving(pid, started, folder):
                log.warning("killing storescp %d left running by a previous run in %s", pid, folder)
                kill_group(pid)
        # Also one started in the instant before a crash, before its pid was recorded.
        for pid in storescps_under(self.spool_dir):
            log.warning("killing storescp %d left running by a previous run in %s", pid, self.spool_dir)
            kill_group(pid)

    def _take_in_left_folders(self) -> None:
        """Take in the spool folders no running association of ours owns: a previous run's, or ours whose
        files could not be stored when the association ended."""
        self._next_rescan = time.monotonic() + RESCAN_INTERVAL_S
        with self._lock:
            ours = {a.folder for a in self._associations.values()}
        taken, now = False, time.monotonic()
        for folder in sorted(p for p in self.spool_dir.iterdir() if p.is_dir() and p not in ours):
            if self._retry_after.get(folder, now) > now:
                continue
            sender = _read_sidecar(folder)
            pid = sender.get("pid")
            if isinstance(pid, int) and storescp_serving(pid, sender.get("start_time"), folder):
                # Still written into by a storescp that is not ours (another service on this spool?).
                if folder not in self._skipped:
                    self._skipped.add(folder)
                    log.error("spool folder %s is written by storescp %d of another process: left alone",
                              folder, pid)
                continue
            association = Association(0, str(sender.get("calling_aet", "")), str(sender.get("called_aet", "")),
                                      str(sender.get("peer_address", "")), folder)
            log.info("taking in the files left in %s", folder)
            if self._take_in_folder(association):
                self._retry_after.pop(folder, None)
            else:
                self._retry_after[folder] = now + RETRY_STORE_AFTER_S
            taken = True
        if taken:
            self.active.close(0)  # what was left is not being sent by anyone


def _is_spooled_object(name: str) -> bool:
    """Whether a name in a spool folder is an object storescp wrote (not our sidecar or its temporary file)."""
    return bool(name) and name != ASSOCIATION_FILE and not name.startswith(".")


def _write_sidecar(folder: Path, content: dict) -> None:
    temporary = folder / f".{ASSOCIATION_FILE}.tmp"
    temporary.write_text(json.dumps(content))
    os.replace(temporary, folder / ASSOCIATION_FILE)  # a crash leaves the old sidecar or the new one, whole


def _read_sidecar(folder: Path) -> dict:
    try:
        content = json.loads((folder / ASSOCIATION_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _request_uids(path: Path) -> tuple[str, str] | None:
    """(Affected SOP Class UID, Affected SOP Instance UID) of the C-STORE request, from the file meta storescp
    wrote (Media Storage SOP Class/Instance UID); None if the file has no readable meta."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # pydicom raises many types on malformed input
        return None
    class_uid, instance_uid = meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")
    if class_uid is None or instance_uid is None:
        return None
    return str(class_uid), str(instance_uid)


_ACCEPTED_SOP_CLASSES = frozenset(STORAGE_SOP_CLASSES.values())
