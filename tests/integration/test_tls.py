"""DICOM TLS on the receiver and on outbound C-STORE, with pynetdicom and dcmtk peers and a PKI made per test."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
from sqlalchemy import func, select

from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.dicom_send import DeliveryError, DicomDestination, c_store
from pacs_bridge.dicom_tls import TlsFiles
from pacs_bridge.scp import ScpSettings, StorageSCP
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine, upgrade
from sql.schema import instances
from tests.support.dicom_factory import write_mr_series
from tests.support.pki import TestPKI
from tests.support.processes import free_port

pytestmark = pytest.mark.needs_dcmtk

STORESCU = shutil.which("storescu")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def pki(tmp_path):
    ca = TestPKI(tmp_path / "pki")
    # An authority the receiver does not trust, and a client certificate it issued.
    rogue_ca = TestPKI(tmp_path / "rogue", "Rogue CA")
    return {"ca": ca, "server": ca.issue("triage-scp", server=True), "mr1": ca.issue("mr1"),
            "rogue_ca": rogue_ca, "rogue": rogue_ca.issue("mr1-rogue")}


@pytest.fixture
def tls_receiver(tmp_path, pki):
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    upgrade(url)
    engine = make_engine(url)
    bookkeeper = Bookkeeper(engine, flush_interval_s=0.05)
    tls = TlsFiles(cert=str(pki["server"].cert), key=str(pki["server"].key), ca=str(pki["ca"].ca),
                   require_client_cert=True)
    scp = StorageSCP(ScpSettings(port=free_port(), allowed_calling_aets=["MR1", "STORESCU"], tls=tls,
                                 network_timeout_s=2.0),
                     InstanceStore(tmp_path / "incoming", tmp_path / "quarantine"), bookkeeper)
    bookkeeper.start()
    scp.start()
    yield scp, engine
    scp.stop()
    bookkeeper.stop()
    engine.dispose()


def _stored(engine) -> int:
    with engine.connect() as c:
        return c.execute(select(func.count()).select_from(instances)).scalar_one()


def _destination(scp, pki, client: str | None = "mr1", ca: str = "ca") -> DicomDestination:
    identity = pki[client] if client else None
    tls = TlsFiles(ca=str(pki[ca].ca), cert=str(identity.cert) if identity else "",
                   key=str(identity.key) if identity else "")
    return DicomDestination("triage", "127.0.0.1", scp.port, "TRIAGE", tls=tls)


def test_sender_with_a_trusted_certificate_stores(tls_receiver, pki, tmp_path):
    scp, engine = tls_receiver
    files = write_mr_series(tmp_path / "send", n=2)
    c_store(_destination(scp, pki), files, calling_aet="MR1", timeout_s=10)
    assert scp.bookkeeper.wait_idle()
    assert _stored(engine) == 2


def test_sender_without_a_certificate_is_refused_and_others_still_store(tls_receiver, pki, tmp_path):
    scp, engine = tls_receiver
    files = write_mr_series(tmp_path / "send", n=1)
    with pytest.raises(DeliveryError):
        c_store(_destination(scp, pki, client=None), files, calling_aet="MR1", timeout_s=5)
    c_store(_destination(scp, pki), files, calling_aet="MR1", timeout_s=10)  # the listener is unharmed
    assert scp.bookkeeper.wait_idle()
    assert _stored(engine) == 1


def test_sender_with_a_certificate_from_an_untrusted_authority_is_refused(tls_receiver, pki, tmp_path):
    scp, engine = tls_receiver
    files = write_mr_series(tmp_path / "send", n=1)
    with pytest.raises(DeliveryError):
        c_store(_destination(scp, pki, client="rogue"), files, calling_aet="MR1", timeout_s=5)
    assert scp.bookkeeper.wait_idle()
    assert _stored(engine) == 0


def test_plain_tcp_sender_is_refused_by_a_tls_listener(tls_receiver, tmp_path):
    scp, engine = tls_receiver
    files = write_mr_series(tmp_path / "send", n=1)
    with pytest.raises((DeliveryError, OSError)):
        c_store(DicomDestination("triage", "127.0.0.1", scp.port, "TRIAGE"), files, calling_aet="MR1",
                timeout_s=5)
    assert _stored(engine) == 0


def test_outbound_c_store_refuses_a_destination_whose_certificate_it_cannot_verify(tls_receiver, pki, tmp_path):
    scp, engine = tls_receiver
    files = write_mr_series(tmp_path / "send", n=1)
    # We trust only the rogue CA: the receiver's certificate (from the test CA) must not be accepted.
    with pytest.raises(DeliveryError):
        c_store(_destination(scp, pki, ca="rogue_ca"), files, calling_aet="MR1", timeout_s=5)
    assert _stored(engine) == 0


def test_a_client_that_never_finishes_the_handshake_does_not_block_the_listener(tls_receiver, pki, tmp_path):
    scp, engine = tls_receiver
    silent = socket.create_connection(("127.0.0.1", scp.port))  # connects, never says hello
    stalled = socket.create_connection(("127.0.0.1", scp.port))
    stalled.sendall(b"\x16\x03\x01\x02\x00")  # the start of a ClientHello record, then nothing
    try:
        files = write_mr_series(tmp_path / "send", n=1)
        started = time.monotonic()
        c_store(_destination(scp, pki), files, calling_aet="MR1", timeout_s=10)
        assert time.monotonic() - started < 5
        assert scp.bookkeeper.wait_idle()
        assert _stored(engine) == 1
        # And the stalled connections are closed by the receiver after its network timeout.
        for sock in (silent, stalled):
            sock.settimeout(10)
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
    finally:
        silent.close()
        stalled.close()


def _storescu_tls(port: int, files, *tls_args: str, aet: str = "STORESCU") -> subprocess.CompletedProcess:
    if STORESCU is None:
        pytest.skip("dcmtk is not installed (run ops/setup.sh)")
    return subprocess.run([STORESCU, *tls_args, "-aet", aet, "-aec", "TRIAGE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, env=DCMTK_ENV, timeout=60)


def test_dcmtk_storescu_with_its_certificate_stores_and_without_is_refused(tls_receiver, pki, tmp_path):
    scp, engine = tls_receiver
    files = write_mr_series(tmp_path / "send", n=2)
    client = pki["mr1"]
    trusted = _storescu_tls(scp.port, files, "+tls", str(client.key), str(client.cert), "+cf", str(pki["ca"].ca))
    assert trusted.returncode == 0, trusted.stderr
    anonymous = _storescu_tls(scp.port, files[:1], "+tla", "+cf", str(pki["ca"].ca))
    assert anonymous.returncode != 0
    plain = _storescu_tls(scp.port, files[:1])
    assert plain.returncode != 0
    assert scp.bookkeeper.wait_idle()
    assert _stored(engine) == 2
