"""The Conformance Statement's tables (docs/conformance.md) are what the code says and what the SCP negotiates.

The SOP class and transfer syntax tables are generated from pacs_bridge.scp; here they are read as a reader of the
statement reads them, and every row is proposed to the running Storage SCP (pynetdicom engine) over a real
association: each documented (SOP class, transfer syntax) pair is accepted, and every other storage SOP class that
pynetdicom knows, and transfer syntaxes outside the table, are refused.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless
from pynetdicom import AE, build_context
from pynetdicom.sop_class import _STORAGE_CLASSES

from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.conformance import documented_rows, main, render
from pacs_bridge.scp import ScpSettings, StorageSCP
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from tests.support.processes import free_port

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture(scope="module")
def tables() -> tuple[list[list[str]], list[list[str]]]:
    text = DOCUMENT.read_text()
    return documented_rows(text, "sop-classes"), documented_rows(text, "transfer-syntaxes")


@pytest.fixture
def scp(tmp_path):
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    upgrade(url)
    engine = make_engine(url)
    bookkeeper = Bookkeeper(engine, flush_interval_s=0.05)
    server = StorageSCP(ScpSettings(port=free_port()), InstanceStore(tmp_path / "in", tmp_path / "q"), bookkeeper)
    bookkeeper.start()
    server.start()
    yield server
    server.stop()
    bookkeeper.stop()
    engine.dispose()


def negotiate(port: int, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """Propose each (abstract, transfer syntax) pair as a context of its own, 127 to an association beside
    Verification (an association with no context accepted is aborted); which were accepted."""
    accepted: dict[tuple[str, str], bool] = {}
    for start in range(0, len(pairs), 127):
        chunk = pairs[start:start + 127]
        ae = AE(ae_title="CONFORMANCE")
        ae.requested_contexts = [build_context(sop, syntax) for sop, syntax in chunk] + [
            build_context(VERIFICATION)]
        association = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        assert association.is_established
        agreed = {(c.abstract_syntax, c.transfer_syntax[0]) for c in association.accepted_contexts}
        association.release()
        accepted.update({pair: pair in agreed for pair in chunk})
    return accepted


def test_the_documents_tables_are_generated_from_the_code_and_up_to_date():
    text = DOCUMENT.read_text()
    assert render(text) == text, "run: python -m pacs_bridge.conformance --write docs/conformance.md"
    assert main(["--check", str(DOCUMENT)]) == 0


def test_a_stale_table_is_found(tmp_path):
    stale = tmp_path / "conformance.md"
    stale.write_text(DOCUMENT.read_text().replace("| CT Image Storage |", "| CT Image Storage (old) |"))
    assert main(["--check", str(stale)]) == 1


def test_the_scp_accepts_every_documented_sop_class_in_every_documented_transfer_syntax(scp, tables):
    sop_rows, syntax_rows = tables
    storage = [row[1] for row in sop_rows if row[1] != VERIFICATION]
    storage_syntaxes = [row[1] for row in syntax_rows if row[2] != "Verification"]
    verification_syntaxes = [row[1] for row in syntax_rows if row[2] == "Verification"]
    pairs = [(sop, syntax) for sop in storage for syntax in storage_syntaxes]
    pairs += [(VERIFICATION, syntax) for syntax in verification_syntaxes]
    refused = [pair for pair, ok in negotiate(scp.port, pairs).items() if not ok]
    assert refused == []
    assert len(storage) >= 10 and len(storage_syntaxes) >= 10  # the tables were read, not empty


def test_the_scp_refuses_what_the_document_does_not_list(scp, tables):
    sop_rows, syntax_rows = tables
    documented = {row[1] for row in sop_rows}
    others = sorted(set(_STORAGE_CLASSES.values()) - documented)
    assert len(others) > 100
    outside = [(sop, ExplicitVRLittleEndian) for sop in others]
    # A documented class in a transfer syntax the document does not list (HTJ2K).
    assert HTJ2KLossless not in {row[1] for row in syntax_rows}
    outside += [(row[1], HTJ2KLossless) for row in sop_rows if row[1] != VERIFICATION]
    accepted = [pair for pair, ok in negotiate(scp.port, outside).items() if ok]
    assert accepted == []
