"""Fuzzing the receiver's path for one object: pacs_bridge.intake.check_received, then InstanceStore.store (or
InstanceStore.quarantine for what is rejected), exactly as the SCP's C-STORE handler runs them.

Properties: the only exception check_received raises is RejectedInstance (its documented rejection, which the SCP
turns into a failure status); what it accepts can always be stored; and no file is ever written outside the
store's incoming/ and quarantine/ folders. Corpus: tests/fixtures/fuzz/corpus and pydicom test files; budget:
tests/fixtures/fuzz/budget.json.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from hypothesis import given

from pacs_bridge.intake import RejectedInstance, check_received
from pacs_bridge.storage import InstanceStore
from tests.support.mutations import budget, generated_file, mutated_file


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    return root, InstanceStore(root / "incoming", root / "quarantine")


def _receive(store: InstanceStore, data: bytes) -> None:
    """The SCP handler's steps for one object, without the network."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every oddity it survives
        try:
            header = check_received(data)
        except RejectedInstance as rejected:
            store.quarantine(data, rejected.reason, {"status": f"0x{rejected.status:04X}"})
            return
    store.store(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid, data)


def _assert_contained(root: Path) -> None:
    allowed = (root / "incoming", root / "quarantine")
    strays = [p for p in root.parent.rglob("*")
              if p.is_file() and not any(folder in p.parents for folder in allowed)]
    assert strays == [], f"files written outside the store: {strays}"
    assert not Path("/tmp/fuzz-escape").exists()


@budget("receive_mutated")
@given(data=mutated_file())
def test_mutated_files_are_stored_or_rejected_and_never_escape_the_store(store, data):
    root, instance_store = store
    _receive(instance_store, data)
    _assert_contained(root)


@budget("receive_generated")
@given(data=generated_file())
def test_generated_bytes_are_rejected_cleanly(store, data):
    root, instance_store = store
    _receive(instance_store, data)
    _assert_contained(root)

