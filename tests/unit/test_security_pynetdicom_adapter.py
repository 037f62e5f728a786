"""The pynetdicom internals :mod:`pacs_bridge.pynetdicom_adapter` relies on are still where it reaches for them.

A pynetdicom upgrade that moves any of them fails here, by name, rather than as a receiver that silently stops
bounding reads, slots or data sets.
"""
from __future__ import annotations

import inspect

import pynetdicom
from pynetdicom import acse, dimse, dul, fsm
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.transport import AssociationSocket

from pacs_bridge import pynetdicom_adapter as adapter


def test_the_installed_pynetdicom_is_the_series_the_adapter_was_written_against():
    assert pynetdicom.__version__.startswith(adapter.PINNED_SERIES)
    adapter.check_version()


def test_the_reached_internals_exist_with_the_behaviour_the_adapter_assumes():
    # Reads: the DUL reads a PDU through AssociationSocket.recv (header, then one read of the announced length).
    assert "recv" in vars(AssociationSocket)
    assert "self.socket.recv(6)" in inspect.getsource(dul.DULServiceProvider._read_pdu_data)
    # Data sets: the state machine hands P-DATA to the instance's dimse.receive_primitive (so it can be wrapped),
    # and a message's data-set fragments are appended to its buffer by decode_msg.
    assert "dul.assoc.dimse.receive_primitive(" in inspect.getsource(fsm)
    assert "presentation_data_value_list" in inspect.getsource(DIMSEMessage.decode_msg)
    assert hasattr(dimse.DIMSEServiceProvider, "receive_primitive")
    # Slots: pynetdicom's own count includes every acceptor thread, so it must be set out of reach.
    assert "active_associations" in inspect.getsource(acse.ACSE._negotiate_as_acceptor)
    # Rejections from EVT_REQUESTED: send_reject marks the association rejected, and the acceptor then skips
    # negotiation (where pynetdicom's own AE check would reject without an event of ours).
    assert "is_rejected = True" in inspect.getsource(acse.ACSE.send_reject)
    assert "if not self.is_aborted and not self.is_rejected:" in inspect.getsource(Association.run_reactor)
    # Slots are freed when the thread ends; kill() marks it.
    assert "self._kill = True" in inspect.getsource(Association.kill)
