"""Adapter: what we change inside pynetdicom's requestor (SCU) associations, and why.

This is the one place where our outbound side reaches inside pynetdicom's
:class:`~pynetdicom.association.Association`; it was read against pynetdicom :data:`VERIFIED_VERSION` and
``tests/integration/test_association.py`` fails when another version is installed, so that whoever upgrades reads it again.

1. :func:`install_reactor_gate`: a reactor checkpoint that cannot let the reactor take a response (below).
2. :func:`send_without_delay`: Nagle's algorithm off on the association's socket. pynetdicom leaves it on, and a
   C-STORE request followed by its data set then waits for the peer's delayed ACK: 48-53 ms per C-STORE to dcmtk's
   storescp on loopback here, 4-9 ms without (200 objects, one association). Faster answers also make the race
   below likelier (stock pynetdicom without Nagle lost 1 and 4 of 1000 C-STORE answers in two runs, on an idle
   machine; with the gate, none), so the two go together.

How a response is lost (pynetdicom 3.0.4, ``association.py``)
-------------------------------------------------------------
An established association runs a *reactor* in its own thread (``Association._run_reactor``). Every pass of its
loop does::

    self._is_paused = True
    self._reactor_checkpoint.wait()        # a threading.Event
    self._is_paused = False
    context_id, msg = self.dimse.get_msg(block=False)
    if msg:
        self._serve_request(msg, context_id)

``dimse.get_msg`` takes the next message off the single DIMSE queue that the DUL thread fills
(``DIMSEServiceProvider.receive_primitive`` puts every decoded P-DATA message there, requests and responses alike).
A sender (``send_c_store``, ``send_c_find``, ``send_c_move``, ``send_c_get``, ``release``) keeps the reactor away
from that queue by a handshake::

    self._reactor_checkpoint.clear()
    while not self._is_paused:
        time.sleep(0.0001)
    self.dimse.send_msg(req, context_id)
    cx_id, rsp = self.dimse.get_msg(block=True)   # waits up to dimse_timeout
    self._reactor_checkpoint.set()

``_is_paused`` is True from the moment the reactor *intends* to wait until it has run on past the wait, so the
sender's test can be answered "paused" by a reactor that is not parked:

1. After ``set()`` at the end of one C-STORE, the reactor is woken but has not run yet (a busy machine has not
   scheduled its thread, or another thread holds the GIL). ``_is_paused`` is still True. The sender goes straight
   on to the next C-STORE: ``clear()``, sees ``_is_paused`` True, sends. ``Event.wait`` returns True to a
   woken waiter even though the flag was cleared again meanwhile, so the reactor runs one more pass.
2. Or the reactor has just returned from ``wait()`` on a set event and is preempted before
   ``_is_paused = False``; the sender clears, sees True, sends.

Either way the reactor's next ``get_msg(block=False)`` can come after the peer's C-STORE-RSP reached the queue and
before the sender's blocking ``get_msg`` took it. The reactor takes it, ``_serve_request`` logs "Received
unexpected C-STORE service message" (a response is not a valid request) and drops it; the sender waits for
``dimse_timeout``, then aborts the association. The object *was* stored by the peer; only its acknowledgement is
gone. C-FIND, C-MOVE and C-GET responses can be lost the same way.

The fix
-------
:class:`ReactorGate` replaces the association's ``_reactor_checkpoint`` (pynetdicom only calls ``set``, ``clear``
and ``wait`` on it, and only the reactor thread waits). The reactor re-checks the gate after every wake-up, and
``clear()`` returns only once the reactor is parked *behind the closed gate* (or has stopped). When the sender then
reads ``_is_paused`` it is True because the reactor set it before parking, and the reactor cannot pass until the
sender's ``set()``. ``clear()`` from the reactor's own thread (``release()`` on a network timeout) does not wait.
"""
from __future__ import annotations

import socket
import threading

from pynetdicom.association import Association

#: The pynetdicom release whose reactor handshake this adapter was written against.
VERIFIED_VERSION = "3.0.4"
#: How often a sender waiting for the reactor to park looks whether the association has stopped meanwhile.
_STOPPED_POLL_S = 0.01


class ReactorGate:
    """The association reactor's checkpoint, with a ``clear()`` that returns when the reactor is parked."""

    def __init__(self, assoc: Association) -> None:
        self._assoc = assoc
        self._cond = threading.Condition(threading.Lock())
        self._open = True
        self._parked = False

    def is_set(self) -> bool:
        with self._cond:
            return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False
            if threading.current_thread() is self._assoc:
                return  # the reactor itself: it is not in its loop while it runs this
            while not self._parked and not self._assoc_stopped():
                self._cond.wait(_STOPPED_POLL_S)

    def wait(self, timeout: float | None = None) -> bool:
        """Park until the gate is open (called by the reactor only; pynetdicom passes no timeout)."""
        with self._cond:
            while not self._open:
                self._parked = True
                self._cond.notify_all()
                if not self._cond.wait(timeout) and timeout is not None:
                    break
            self._parked = False
            return self._open

    def _assoc_stopped(self) -> bool:
        # kill() sets _kill (and _is_paused); a reactor that has ended will never park.
        return bool(getattr(self._assoc, "_kill", False)) or (
            self._assoc.ident is not None and not self._assoc.is_alive())


def install_reactor_gate(assoc: Association) -> Association:
    """Give an established requestor association a :class:`ReactorGate`; returns it.

    Safe on a running reactor: until a sender first clears it, the old checkpoint is open and the reactor only
    passes it; from its next pass on the reactor reads the new gate, which a sender's ``clear()`` waits behind.
    """
    if not isinstance(assoc._reactor_checkpoint, ReactorGate):
        assoc._reactor_checkpoint = ReactorGate(assoc)
    return assoc


def send_without_delay(assoc: Association) -> Association:
    """Turn Nagle's algorithm off on the association's socket (TLS or not); returns it."""
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc
