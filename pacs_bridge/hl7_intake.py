"""Final-report intake: HL7 v2 ORU^R01 over MLLP (python-hl7's asyncio streams).

Each message gets one acknowledgement, in original mode (HL7 v2.5 §2.9.2):

- ``AA`` (application accept): the report is stored (or was already stored under the same MSH-10), with its labels.
- ``AR`` (application reject): the message is malformed or not an ORU^R01, so resending it will not help. Its raw
  bytes are kept under ``<kept_dir>/rejected/`` with the reason beside them, a row in ``hl7_messages`` and an
  ``hl7_reject`` event; MSA-3 carries the reason to the sender.
- ``AE`` (application error): we failed (the database is down, say); the sender should retry. Kept like a reject.
  Only transient failures of ours answer AE: an MLLP sender resends an AE'd message before any later one, so a
  message that can never be stored (a NUL, a value the database refuses) must get AR, or it blocks the feed.

Enhanced mode (MSH-15 accept acknowledgement type present): the same outcomes answer the commit codes ``CA``,
``CR`` and ``CE``; application acknowledgements (MSH-16) are not sent. A message whose MSH cannot be read at all
(truncated, garbage) gets an original-mode ``AR``. Every framed message gets its acknowledgement, whatever fails.
Senders, TLS and the listener's limits: :mod:`pacs_bridge.hl7_senders`.

Where the fields come from:

==================  ======================================================================================
accession number    OBR-18 (IHE), else OBR-3 (filler order number), else ORC-3
study instance UID  ZDS-1, else an OBX whose identifier is DCM 113014 "Study Instance UID" (IHE RAD)
examination time    OBR-7 (observation date/time)
report time         OBR-22 (results report/status change), else MSH-7
result status       OBR-25 (F final, C corrected, P preliminary, ...); empty means F
report text         OBX-5 of every TX/FT/ST/CE OBX, repetitions and ``\\.br\\`` as line breaks
attributes          PID-7, PID-8, PID-10, PID-11.5, PID-22, PV1-20, IN1-15 (see ``pacs_bridge.study_attributes``)
==================  ======================================================================================

Times without a UTC offset are local times of the configured time zone.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import hl7
from hl7.mllp import open_hl7_connection
from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError

from pacs_bridge.hl7_senders import MllpLimits, SenderAllowList
from pacs_bridge.report_intake import FinalReport, Labeller, ReportValidationError, store_report
from pacs_bridge.study_attributes import AttributePolicy, attributes_from_hl7
from sql.report_schema import hl7_messages
from sql.schema import events, utcnow

log = logging.getLogger(__name__)

START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\r"
#: HL7 table 0008 acknowledgement codes.
ACK_ACCEPT, ACK_REJECT, ACK_ERROR = "AA", "AR", "AE"
#: The same outcomes in enhanced mode (commit acknowledgements, HL7 v2.5 2.9.3).
COMMIT_CODES = {ACK_ACCEPT: "CA", ACK_REJECT: "CR", ACK_ERROR: "CE"}
TEXT_VALUE_TYPES = frozenset({"TX", "FT", "ST", "CE", "CWE"})
STUDY_UID_OBSERVATION = "113014"
MAX_MESSAGE_BYTES = MllpLimits.max_message_bytes


class MalformedMessage(ValueError):
    """An HL7 message we cannot use; the text says which field and why, and goes back in MSA-3."""


@dataclass(frozen=True)
class IntakeOutcome:
    ack_code: str
    reason: str
    report_id: int | None = None
    labels: tuple[tuple[str, int], ...] = ()


def decode_message(raw: bytes) -> str:
    """The message as text with segments separated by CR (some senders use LF or CRLF)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # HL7 v2's traditional 8859/1; it decodes any byte string.
    return text.replace("\r\n", "\r").replace("\n", "\r").strip("\r \x00")


def parse_message(text: str) -> hl7.Message:
    if not text.startswith("MSH"):
        # Only the first three characters: a misframed message may begin with a segment holding identifiers.
        raise MalformedMessage(f"the message does not begin with an MSH segment (it begins {text[:3]!r})")
    try:
        message = hl7.parse(text)
    except Exception as exc:  # python-hl7 raises ParseException and, for odd separators, IndexError and others
        raise MalformedMessage(f"not parseable as HL7 v2: {exc}") from exc
    if len(str(message.segment("MSH")(2))) < 1:
        raise MalformedMessage("MSH-2 (encoding characters) is empty")
    if len(message.segment("MSH")) < 13:
        raise MalformedMessage(f"the MSH segment is truncated: {len(message.segment('MSH')) - 1} fields, "
                               "where MSH-12 (version) is required")
    return message


def check_characters(text: str) -> None:
    """Raise :class:`MalformedMessage` for characters no HL7 v2 value may hold (and no database column takes)."""
    if "\x00" in text:
        segment = text[:text.index("\x00")].count("\r") + 1
        raise MalformedMessage(f"segment {segment} contains a NUL character, which HL7 v2 text may not hold")


def field(message: hl7.Message, segment: str, number: int, component: int = 1, repetition: int = 1) -> str:
    """One component of a field, unescaped, or '' where the segment or field is absent."""
    try:
        value = message.extract_field(segment, 1, number, repetition, component)
    except (KeyError, IndexError):
        return ""
    return message.unescape(str(value)) if value else ""


def parse_datetime(value: str, what: str, policy: AttributePolicy) -> datetime | None:
    if not value:
        return None
    try:
        return policy.local_to_utc(hl7.parse_datetime(value))
    except (ValueError, OverflowError) as exc:  # OverflowError: 9999-12-31T23:59:59-12:00 is past year 9999 in UTC
        raise MalformedMessage(f"{what} {value[:40]!r} is not an HL7 date/time (YYYYMMDD[HHMM[SS]][+/-ZZZZ]) "
                               f"in years 1-9999: {exc}") from exc


def report_from_oru(message: hl7.Message, policy: AttributePolicy) -> FinalReport:
    """The final report an ORU^R01 carries; raises :class:`MalformedMessage` naming the field at fault."""
    kind = (field(message, "MSH", 9, 1), field(message, "MSH", 9, 2))
    if kind != ("ORU", "R01"):
        raise MalformedMessage(f"MSH-9 message type {'^'.join(kind)!r} is not ORU^R01")
    if not _has(message, "OBR"):
        raise MalformedMessage("the ORU^R01 has no OBR segment")
    accession = field(message, "OBR", 18) or field(message, "OBR", 3) or field(message, "ORC", 3)
    study_uid = field(message, "ZDS", 1)
    text_lines: list[str] = []
    encoding_characters = str(message.segment("MSH")(2))
    component, repetition = encoding_characters[0:1] or "^", encoding_characters[1:2] or "~"
    for obx in _segments(message, "OBX"):
        value_type = str(obx(2)).strip().upper()
        identifier = str(obx(3)).split(component)[0].strip()
        raw_value = str(obx(5)) if len(obx) > 5 else ""
        if identifier == STUDY_UID_OBSERVATION and not study_uid:
            study_uid = message.unescape(raw_value).strip()
        elif value_type in TEXT_VALUE_TYPES or not value_type:
            for part in raw_value.split(repetition):
                text_lines.append(message.unescape(part).replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text_lines).strip()
    if not text:
        raise MalformedMessage("no report text: no OBX segment of type TX, FT or ST has an OBX-5 value")
    if study_uid and not _is_uid(study_uid):
        raise MalformedMessage(f"study instance UID {study_uid[:80]!r} is not a valid DICOM UID")
    if not (accession or study_uid):
        raise MalformedMessage("no accession number (OBR-18, OBR-3, ORC-3) and no study instance UID (ZDS-1)")
    exam_at = parse_datetime(field(message, "OBR", 7), "OBR-7 observation date/time", policy)
    reported_at = (parse_datetime(field(message, "OBR", 22), "OBR-22 report date/time", policy)
                   or parse_datetime(field(message, "MSH", 7), "MSH-7 message date/time", policy))
    if reported_at is None:
        raise MalformedMessage("no report time: OBR-22 and MSH-7 are both empty")
    status = (field(message, "OBR", 25) or "F").strip().upper()
    hl7_fields = {name: field(message, segment, number, component) for name, segment, number, component in (
        ("PID-7", "PID", 7, 1), ("PID-8", "PID", 8, 1), ("PID-11.5", "PID", 11, 5), ("PV1-20", "PV1", 20, 1),
        ("IN1-15", "IN1", 15, 1))}
    hl7_fields["PID-22"] = field(message, "PID", 22, 2) or field(message, "PID", 22, 1)
    hl7_fields["PID-10"] = field(message, "PID", 10, 2) or field(message, "PID", 10, 1)
    try:
        return FinalReport(
            text=text, reported_at=reported_at, exam_at=exam_at, status=status, source="hl7",
            accession_number=accession[:64] or None, study_instance_uid=study_uid or None,
            source_message_id=field(message, "MSH", 10)[:64] or None,
            attributes=attributes_from_hl7(hl7_fields, policy, exam_at),
        )
    except ReportValidationError as exc:
        raise MalformedMessage(str(exc)) from exc


def _segments(message: hl7.Message, name: str) -> list:
    try:
        return list(message.segments(name))
    except KeyError:
        return []


def _has(message: hl7.Message, name: str) -> bool:
    return bool(_segments(message, name))


def _is_uid(text: str) -> bool:
    return len(text) <= 64 and re.fullmatch(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))+", text) is not None


def is_enhanced_mode(message: hl7.Message | None) -> bool:
    """Whether the sender asked for enhanced-mode acknowledgements (MSH-15 accept acknowledgement type set)."""
    return message is not None and bool(field(message, "MSH", 15).strip())


def _hl7_text(text: str) -> str:
    """``text`` safe inside one field of a message with the default encoding characters ``^~\\&``."""
    escaped = (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
               .replace("&", "\\T\\").replace("~", "\\R\\"))
    return "".join(c if c >= " " else " " for c in escaped)


def build_ack(message: hl7.Message | None, code: str, reason: str, application: str, facility: str) -> bytes:
    """The acknowledgement of ``message`` with MSA-1 ``code`` (in enhanced mode its commit code) and MSA-3
    ``reason``. Never fails: without a usable MSH (garbage, a truncated header) one is made from what can be read."""
    reason = reason[:200]
    if is_enhanced_mode(message):
        code = COMMIT_CODES.get(code, code)
    if message is not None:
        try:
            ack = message.create_ack(code, application=application, facility=facility)
            ack.segment("MSA").assign_field(message.escape(reason), 3)
            return str(ack).encode("utf-8")
        except Exception:  # noqa: BLE001 - python-hl7 raises IndexError and others on short MSH segments
            pass
    control_id = field(message, "MSH", 10) if message is not None else ""
    sender = [field(message, "MSH", n) if message is not None else "" for n in (3, 4)]
    now = datetime.now().strftime("%Y%m%d%H%M%S")
    msh = "|".join(["MSH", "^~\\&", _hl7_text(application), _hl7_text(facility), _hl7_text(sender[0]),
                    _hl7_text(sender[1]), now, "", "ACK", f"ACK{now}", "P", "2.5"])
    msa = "|".join(["MSA", code, _hl7_text(control_id[:199]), _hl7_text(reason)])
    return f"{msh}\r{msa}\r".encode("utf-8")


class ReportIntake:
    """Turns one MLLP block into a stored report (or a kept reject) and the ACK for it. Thread-safe."""

    def __init__(self, engine: Engine, policy: AttributePolicy, kept_dir: str | Path,
                 labeller: Labeller | None = None, application: str = "TRIAGE", facility: str = "",
                 senders: SenderAllowList | None = None) -> None:
        self.engine = engine
        self.policy = policy
        self.kept_dir = Path(kept_dir)
        self.labeller = labeller
        self.application = application
        self.facility = facility
        self.senders = senders or SenderAllowList()

    def handle(self, raw: bytes, peer: str = "", address: str = "") -> tuple[bytes, IntakeOutcome]:
        """The ACK for one framed message and what became of it. ``address``: the peer's IP, for the allow-list."""
        try:
            return self._handle(raw, peer, address)
        except Exception as exc:  # noqa: BLE001 - even keeping failed (disk full): still answer, and let it retry
            log.exception("HL7 intake: handling a message from %s failed", peer)
            outcome = IntakeOutcome(ACK_ERROR, f"could not take the message: {type(exc).__name__}: {exc}"[:200])
            return build_ack(None, ACK_ERROR, outcome.reason, self.application, self.facility), outcome

    def _handle(self, raw: bytes, peer: str, address: str) -> tuple[bytes, IntakeOutcome]:
        received_at = utcnow()
        message: hl7.Message | None = None
        try:
            text = decode_message(raw)
            message = parse_message(text)
            check_characters(text)
            refusal = self.senders.refusal(field(message, "MSH", 3), field(message, "MSH", 4), address)
            if refusal is not None:
                raise MalformedMessage(refusal)
            report = report_from_oru(message, self.policy)
        except Exception as exc:  # noqa: BLE001 - whatever the message does to the parser, resending will not help
            reason = str(exc) if isinstance(exc, MalformedMessage) else \
                f"the message could not be interpreted ({type(exc).__name__}: {exc})"
            outcome = IntakeOutcome(ACK_REJECT, reason)
            self._keep(raw, peer, message, outcome, received_at, "rejected")
            return build_ack(message, ACK_REJECT, reason, self.application, self.facility), outcome
        try:
            with self.engine.begin() as connection:
                stored = store_report(connection, report, self.labeller)
                connection.execute(insert(hl7_messages).values(
                    received_at=received_at, peer=peer[:64], control_id=report.source_message_id,
                    message_type="ORU^R01", status="accepted", ack_code=ACK_ACCEPT,
                    reason="duplicate of an earlier message" if stored.duplicate else None,
                    size_bytes=len(raw), report_id=stored.report_id))
        except DataError as exc:  # a value the database refuses: the same message would be refused again
            reason = f"a value cannot be stored: {str(exc.orig or exc).splitlines()[0]}"[:200]
            outcome = IntakeOutcome(ACK_REJECT, reason)
            self._keep(raw, peer, message, outcome, received_at, "rejected")
            return build_ack(message, ACK_REJECT, reason, self.application, self.facility), outcome
        except Exception as exc:  # the database, the labeller: our fault, so AE and the sender retries
            log.exception("HL7 intake: storing report from %s failed", peer)
            outcome = IntakeOutcome(ACK_ERROR, f"could not store the report: {type(exc).__name__}: {exc}"[:200])
            self._keep(raw, peer, message, outcome, received_at, "error")
            return build_ack(message, ACK_ERROR, outcome.reason, self.application, self.facility), outcome
        log.info("HL7 intake: report %s (accession %s, study %s) from %s stored with %d labels%s",
                 stored.report_id, report.accession_number, stored.study_instance_uid, peer, len(stored.labels),
                 " (duplicate)" if stored.duplicate else "")
        outcome = IntakeOutcome(ACK_ACCEPT, "", stored.report_id, stored.labels)
        return build_ack(message, ACK_ACCEPT, "", self.application, self.facility), outcome

    def _keep(self, raw: bytes, peer: str, message: hl7.Message | None, outcome: IntakeOutcome,
              received_at: datetime, status: str) -> None:
        """Write the raw message and its reason to disk and record both; nothing is dropped silently."""
        digest = hashlib.sha256(raw).hexdigest()
        folder = self.kept_dir / status / received_at.strftime("%Y%m%d")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{received_at.strftime('%H%M%S%f')}-{digest[:12]}"
        path = folder / f"{stem}.hl7"
        path.write_bytes(raw)
        (folder / f"{stem}.reason.txt").write_text(f"{outcome.ack_code}: {outcome.reason}\npeer: {peer}\n")
        control_id = field(message, "MSH", 10)[:64] if message is not None else None
        message_type = "^".join(filter(None, (field(message, "MSH", 9, 1), field(message, "MSH", 9, 2)))) \
            if message is not None else None
        log.warning("HL7 intake: %s message from %s %s (%s), kept at %s", status, peer, control_id,
                    outcome.reason, path)
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(hl7_messages).values(
                    received_at=received_at, peer=peer[:64], control_id=control_id,
                    message_type=(message_type or None) and message_type[:16], status=status,
                    ack_code=outcome.ack_code, reason=outcome.reason, path=str(path), sha256=digest,
                    size_bytes=len(raw)))
                connection.execute(insert(events).values(
                    at=received_at, kind="hl7_reject" if status == "rejected" else "hl7_error",
                    reason=outcome.reason, detail={"path": str(path), "peer": peer, "control_id": control_id}))
        except Exception:  # the file on disk is the record when the database is what failed
            log.exception("HL7 intake: could not record the kept message %s in the database", path)


class MessageTimeout(Exception):
    """A message did not arrive whole within the message timeout (a dripping or stalled peer)."""


class MllpReportListener:
    """An MLLP server on its own thread and event loop; storing runs on worker threads, off the loop.

    Peers are bounded (:class:`~pacs_bridge.hl7_senders.MllpLimits`): connections at once, silence between messages,
    time from a message's first byte to its end block (and for a TLS handshake), bytes per message. Connections
    from addresses no configured sender may use are closed before anything is read.
    """

    def __init__(self, intake: ReportIntake, host: str = "127.0.0.1", port: int = 2575,
                 on_outcome: Callable[[IntakeOutcome], None] | None = None, *,
                 limits: MllpLimits | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.intake = intake
        self.host = host
        self.port = port
        self.on_outcome = on_outcome
        self.limits = limits or MllpLimits()
        self.ssl_context = ssl_context
        self.open_connections = 0
        self.refused_connections = 0
        self._clients: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> MllpReportListener:
        if self.intake.senders.open:
            log.warning("MLLP: no fairness.mllp_senders configured: any peer may send final reports")
        self._thread = threading.Thread(target=self._run, name="mllp-listener", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError(f"MLLP listener could not listen on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        if self._thread is not None:
            self._thread.join(10)

    async def _shutdown(self) -> None:
        """Stop listening, end the open connections' tasks, then the loop (no transport outlives its loop)."""
        assert self._server is not None
        self._server.close()
        for task in self._clients:
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        asyncio.get_running_loop().stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            tls = {"ssl": self.ssl_context, "ssl_handshake_timeout": self.limits.message_timeout_s} \
                if self.ssl_context is not None else {}
            self._server = loop.run_until_complete(asyncio.start_server(self._client, self.host, self.port, **tls))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address, port = writer.get_extra_info("peername")[:2]
        peer = f"{address}:{port}"
        if not self.intake.senders.permits_connection(address):
            self.refused_connections += 1
            log.warning("MLLP: refused a connection from %s: no allowed sender (fairness.mllp_senders) uses that "
                        "address", peer)
            writer.close()
            return
        if self.open_connections >= self.limits.max_connections:
            self.refused_connections += 1
            log.warning("MLLP: refused a connection from %s: %d connections open (fairness.mllp_max_connections)",
                        peer, self.open_connections)
            writer.close()
            return
        self.open_connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        try:
            while True:
                try:
                    block = await self._read_block(reader, buffer)
                except (TimeoutError, MessageTimeout) as exc:
                    log.warning("MLLP: closing the connection from %s: %s", peer,
                                exc or f"silent for {self.limits.idle_timeout_s:g}s")
                    return
                except BufferError:
                    log.warning("MLLP: message from %s over %d bytes; closing the connection", peer,
                                self.limits.max_message_bytes)
                    return
                if block is None:
                    return
                # A block without its start character is still a message: it is acknowledged (and kept if bad).
                raw = block[block.index(START_BLOCK) + 1:] if START_BLOCK in block else block
                ack, outcome = await loop.run_in_executor(None, self.intake.handle, raw, peer, address)
                writer.write(START_BLOCK + ack + END_BLOCK + CARRIAGE_RETURN)
                await asyncio.wait_for(writer.drain(), self.limits.message_timeout_s)
                if self.on_outcome is not None:
                    self.on_outcome(outcome)
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            log.warning("MLLP: connection from %s ended: %s", peer, exc)
        finally:
            self.open_connections -= 1
            self._clients.discard(task)
            writer.close()

    async def _read_block(self, reader: asyncio.StreamReader, buffer: bytearray) -> bytes | None:
        """The next block up to its end characters (FS CR), or None when the peer closed between messages.

        Raises TimeoutError after ``idle_timeout_s`` without a byte between messages, :class:`MessageTimeout` when a
        message has not ended ``message_timeout_s`` after its first byte, BufferError past ``max_message_bytes``.
        """
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            end = buffer.find(END_BLOCK + CARRIAGE_RETURN)
            if end >= 0:
                block = bytes(buffer[:end])
                del buffer[:end + 2]
                return block
            if len(buffer) > self.limits.max_message_bytes:
                raise BufferError(len(buffer))
            if deadline is None and buffer.strip(b"\r\n\x00 "):
                deadline = loop.time() + self.limits.message_timeout_s
            if deadline is None:
                timeout = self.limits.idle_timeout_s
            else:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    raise MessageTimeout(f"a message was not complete {self.limits.message_timeout_s:g}s after its "
                                         f"first byte ({len(buffer)} bytes so far)")
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout)
            except TimeoutError:
                if deadline is not None:
                    continue  # the deadline check above names the message timeout
                raise
            if not chunk:
                if buffer.strip(b"\r\n\x00 "):
                    log.warning("MLLP: the peer closed the connection inside a message (%d bytes)", len(buffer))
                return None
            buffer += chunk


async def _send(host: str, port: int, messages: list[bytes], timeout: float,
                ssl_context: ssl.SSLContext | None = None) -> list[str]:
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port, ssl=ssl_context), timeout)
    acks = []
    try:
        for message in messages:
            writer.writeblock(message)
            await writer.drain()
            acks.append((await asyncio.wait_for(reader.readblock(), timeout)).decode("utf-8", "replace"))
    finally:
        writer.close()
    return acks


def send_messages(host: str, port: int, messages: list[bytes | str], timeout: float = 30.0,
                  ssl_context: ssl.SSLContext | None = None) -> list[str]:
    """Send HL7 messages over one MLLP connection (TLS with ``ssl_context``); returns each ACK's text."""
    encoded = [m.encode("utf-8") if isinstance(m, str) else m for m in messages]
    return asyncio.run(_send(host, port, encoded, timeout, ssl_context))


def ack_code(ack_text: str) -> str:
    """MSA-1 of an ACK's text."""
    for segment in ack_text.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            return segment.split(segment[3:4] or "|")[1]
    raise ValueError(f"no MSA segment in {ack_text[:80]!r}")
