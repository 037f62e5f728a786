"""What a client can make a real `triage api` process hold: memory before authentication or beyond the limits,
and connections kept open by dripping a request. Plus the STOW-RS multipart parser under arbitrary chunking."""
from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import httpx
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from tests.support.api_process import ApiProcess
from tests.support.dicom_factory import mr_slice
from tests.support.processes import wait_for
from worker.api.stow import MultipartError, iter_parts

ADMIN_TOKEN = "tok-admin-" + "a" * 36
SENDER_TOKEN = "tok-sender-" + "s" * 36
TOKENS = {"ops": ("admin", ADMIN_TOKEN), "modality": ("sender", SENDER_TOKEN)}
MIB = 1024 * 1024
#: What the API process may grow by while refusing a 60 MB body (it must not hold the body).
ALLOWED_GROWTH_KIB = 24 * 1024


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits")
    process = ApiProcess(folder, f"sqlite:///{folder / 'api.db'}", TOKENS, config={
        "api": {"header_timeout_s": 2, "body_timeout_s": 2, "max_connections": 8},
        "scp": {"max_object_bytes": MIB}}).start()
    yield process
    process.stop()


def send_raw(port: int, head: bytes, body: bytes | None = None, total: int = 0, timeout: float = 60) -> int:
    """Sends ``head``, then ``total`` bytes of ``body`` repeated (from a thread, stopping when the server hangs up),
    and returns the response's status code."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)

    def pour() -> None:
        sent = 0
        try:
            while sent < total:
                sock.sendall(body)
                sent += len(body)
        except OSError:  # the server answered and closed without reading the rest: what we want
            pass

    sock.sendall(head)
    writer = threading.Thread(target=pour, daemon=True)
    writer.start()
    try:
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return int(answer.split(b" ", 2)[1]) if answer else 0
    finally:
        sock.close()
        writer.join(10)


def json_post(port: int, path: str, length: int, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {length}\r\n\r\n").encode()


# --- finding 7: memory before authentication or limits ------------------------------------------------------

def test_a_large_json_body_without_a_token_is_refused_before_it_is_read(api):
    size = 60_000_000
    before = api.memory_kib()
    # A JSON array of numbers: the costliest kind of document to parse into Python objects.
    status = send_raw(api.port, json_post(api.port, "/reports", size), b"[" + b"1," * 32767 + b"1]",
                      total=size)
    assert status == 401
    assert api.memory_kib() - before < ALLOWED_GROWTH_KIB


def test_a_large_json_body_with_a_token_is_refused_beyond_the_limit_without_being_held(api):
    before = api.memory_kib()
    assert send_raw(api.port, json_post(api.port, "/reports", 60_000_000, ADMIN_TOKEN), b"1," * 32768,
                    total=60_000_000) == 413
    # Without a length (chunked), the limit is counted as the body streams in.
    head = (f"POST /reports HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {ADMIN_TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"10000\r\n" + b"1," * 32768 + b"\r\n"
    assert send_raw(api.port, head, chunk, total=60_000_000) == 413
    assert api.memory_kib() - before < ALLOWED_GROWTH_KIB


def dicom_bytes(study: str, index: int) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, mr_slice(study, generate_uid(), index), enforce_file_format=True)
    return buffer.getvalue()


def multipart(parts: list[bytes], boundary: str) -> bytes:
    out = b""
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_a_stow_rs_part_over_scp_max_object_bytes_is_refused_as_it_streams_and_the_others_are_stored(api):
    study = generate_uid()
    small = dicom_bytes(study, 1)
    boundary = "stow-boundary-7f3a"
    head_part = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    huge = 60 * MIB
    tail = b"\r\n" + multipart([small], boundary)

    def body():
        yield head_part
        block = b"\x00" * MIB
        for _ in range(huge // MIB):
            yield block
        yield tail

    before = api.memory_kib()
    response = httpx.post(f"{api.url}/dicom-web/studies", content=body(), timeout=120, headers={
        "Authorization": f"Bearer {SENDER_TOKEN}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})

    assert response.status_code == 202, response.text
    document = response.json()
    stored = [item["00081155"]["Value"][0] for item in document["00081199"]["Value"]]
    assert stored == [pydicom.dcmread(io.BytesIO(small)).SOPInstanceUID]
    (failed,) = document["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700]  # Out of Resources, as C-STORE answers it
    assert api.memory_kib() - before < ALLOWED_GROWTH_KIB


# --- finding 8: slow requests and held connections ---------------------------------------------------------

def seconds_until_closed(port: int, drip: bytes | None, limit: float = 12) -> float:
    """Opens a connection, sends ``drip`` a byte every 0.3 s (or nothing), and returns when the server closed it."""
    start = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(0.3)
    try:
        index = 0
        while time.monotonic() - start < limit:
            if drip and index < len(drip):
                try:
                    sock.sendall(drip[index:index + 1])
                except OSError:
                    return time.monotonic() - start
                index += 1
            try:
                if sock.recv(4096) == b"":
                    return time.monotonic() - start
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - start
        return float("inf")
    finally:
        sock.close()


def test_a_connection_that_drips_its_headers_or_sends_nothing_is_closed(api):
    assert seconds_until_closed(api.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100) < 6
    assert seconds_until_closed(api.port, None) < 6


def test_a_request_body_that_stops_arriving_is_answered_408_and_closed(api):
    sock = socket.create_connection(("127.0.0.1", api.port))
    sock.settimeout(10)
    try:
        sock.sendall(json_post(api.port, "/reports", 1000, ADMIN_TOKEN) + b'{"text": "')
        start = time.monotonic()
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - start < 6
        sock.settimeout(5)
        while sock.recv(4096):  # the connection is closed after the answer, not kept for the rest
            pass
    finally:
        sock.close()


def test_idle_connections_beyond_the_limit_do_not_keep_the_api_unavailable(api):
    idle = [socket.create_connection(("127.0.0.1", api.port)) for _ in range(8)]
    try:
        wait_for(lambda: httpx.get(f"{api.url}/healthz", timeout=5).status_code == 503, 30,
                 what="the idle connections to take every slot")
        assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 503  # at most max_connections
        # The idle ones are closed after header_timeout_s.
        wait_for(lambda: httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200, 60,
                 what="the idle connections to be closed")
        assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
    finally:
        for sock in idle:
            sock.close()


# --- the STOW-RS multipart parser, chunked anyhow -------------------------------------------------------------

BOUNDARY = "b0undary-Zq"


async def _chunks(data: bytes, cuts: list[int]):
    last = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        yield data[last:cut]
        last = cut


def _parse(data: bytes, cuts: list[int], limit: int = 1 << 30) -> list[tuple[str, bytes | None, int]]:
    async def run():
        return [(p.headers.get("content-type"), None if p.body is None else bytes(p.body), p.size)
                async for p in iter_parts(_chunks(data, cuts), BOUNDARY, limit)]

    return asyncio.run(run())


#: Bodies made of bytes that matter to a multipart parser: CR, LF, dashes and pieces of the boundary.
_near_misses = st.sampled_from([b"\r", b"\n", b"\r\n", b"-", b"--", b"\r\n--", b"\r\n--b0und", b"--b0undary",
                                b"\r\n--b0undary-Z", b"\x00", b"DICM"])
_body = st.lists(st.one_of(st.binary(max_size=40), _near_misses), max_size=12).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies=st.lists(_body, min_size=1, max_size=5), preamble=st.sampled_from([b"", b"preamble\r\n", b"\r\n"]),
       epilogue=st.sampled_from([b"", b"\r\n", b"epilogue"]), data=st.data())
def test_the_stow_parser_finds_the_same_parts_however_the_body_is_chunked(bodies, preamble, epilogue, data):
    delimiter = b"\r\n--" + BOUNDARY.encode()
    bodies = [b for b in bodies if delimiter not in b + b"\r\n" and not (b"\r\n" + b).startswith(delimiter)]
    if not bodies:
        return
    message = preamble + b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\nX-Index: {i}\r\n\r\n".encode() + body + b"\r\n"
        for i, body in enumerate(bodies)) + f"--{BOUNDARY}--".encode() + epilogue
    cuts = data.draw(st.lists(st.integers(0, len(message)), max_size=30))

    parts = _parse(message, cuts)

    assert parts == [("application/dicom", body, len(body)) for body in bodies]
    # And a part over the limit comes out counted, without its bytes.
    limit = max(len(b) for b in bodies) - 1
    if limit >= 0:
        assert _parse(message, cuts, limit) == [("application/dicom", None if len(b) > limit else b, len(b))
                                                for b in bodies]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_stow_body_cut_short_is_an_error_however_it_is_chunked(data):
    message = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"x" * 50 + \
        f"\r\n--{BOUNDARY}--".encode()
    end = data.draw(st.integers(0, len(message) - 1))
    cuts = data.draw(st.lists(st.integers(0, end), max_size=10))
    with pytest.raises(MultipartError):
        _parse(message[:end], cuts)
