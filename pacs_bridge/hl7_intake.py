"""Final-report intake: HL7 v2 ORU^R01 over MLLP (python-hl7's asyncio streams).

Each message gets one acknowledgement, in original mode (HL7 v2.5 §2.9.2):

- ``AA`` (application accept): the report is stored (or was already stored under the same MSH-10), with its labels.
- ``AR`` (application reject): the message is malformed or not an ORU^R01, so resending it will not help. Its raw
  bytes are kept under ``<kept_dir>/rejected/`` with the reason beside them, a row in ``hl7_messages`` and an
  ``hl7_reject`` event; MSA-3 carries the reason to the sender.
- ``AE`` (application error): we failed (the database is down, say); the sender should retry. Kept like a reject.

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
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import hl7
from hl7.mllp import open_hl7_connection, start_hl7_server
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from pacs_bridge.report_intake import FinalReport, Labeller, ReportValidationError, store_report
from pacs_bridge.report_schema import hl7_messages
from pacs_bridge.schema import events, utcnow
from pacs_bridge.study_attributes import AttributePolicy, attributes_from_hl7

log = logging.getLogger(__name__)

START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\r"
#: HL7 table 0008 acknowledgement codes.
ACK_ACCEPT, ACK_REJECT, ACK_ERROR = "AA", "AR", "AE"
TEXT_VALUE_TYPES = frozenset({"TX", "FT", "ST", "CE", "CWE"})
STUDY_UID_OBSERVATION = "113014"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


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
    return message


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
        parsed = hl7.parse_datetime(value)
    except ValueError as exc:
        raise MalformedMessage(f"{what} {value!r} is not an HL7 date/time (YYYYMMDD[HHMM[SS]][+/-ZZZZ])") from exc
    return policy.local_to_utc(parsed)


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


def build_ack(message: hl7.Message | None, code: str, reason: str, application: str, facility: str) -> bytes:
    """An original-mode ACK; without a usable MSH (garbage in) one is made from ours."""
    reason = reason[:200]
    if message is None:
        message = hl7.parse(f"MSH|^~\\&|||{application}|{facility}|||ACK^R01|unknown|P|2.5")
    ack = message.create_ack(code, application=application, facility=facility)
    ack.segment("MSA").assign_field(message.escape(reason), 3)
    return str(ack).encode("utf-8")


class ReportIntake:
    """Turns one MLLP block into a stored report (or a kept reject) and the ACK for it. Thread-safe."""

    def __init__(self, engine: Engine, policy: AttributePolicy, kept_dir: str | Path,
                 labeller: Labeller | None = None, application: str = "TRIAGE", facility: str = "") -> None:
        self.engine = engine
        self.policy = policy
        self.kept_dir = Path(kept_dir)
        self.labeller = labeller
        self.application = application
        self.facility = facility

    def handle(self, raw: bytes, peer: str = "") -> tuple[bytes, IntakeOutcome]:
        received_at = utcnow()
        message: hl7.Message | None = None
        try:
            message = parse_message(decode_message(raw))
            report = report_from_oru(message, self.policy)
        except MalformedMessage as exc:
            outcome = IntakeOutcome(ACK_REJECT, str(exc))
            self._keep(raw, peer, message, outcome, received_at, "rejected")
            return build_ack(message, ACK_REJECT, str(exc), self.application, self.facility), outcome
        try:
            with self.engine.begin() as connection:
                stored = store_report(connection, report, self.labeller)
                connection.execute(insert(hl7_messages).values(
                    received_at=received_at, peer=peer[:64], control_id=report.source_message_id,
                    message_type="ORU^R01", status="accepted", ack_code=ACK_ACCEPT,
                    reason="duplicate of an earlier message" if stored.duplicate else None,
                    size_bytes=len(raw), report_id=stored.report_id))
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


class MllpReportListener:
    """An MLLP server on its own thread and event loop; storing runs on worker threads, off the loop."""

    def __init__(self, intake: ReportIntake, host: str = "127.0.0.1", port: int = 2575,
                 on_outcome: Callable[[IntakeOutcome], None] | None = None) -> None:
        self.intake = intake
        self.host = host
        self.port = port
        self.on_outcome = on_outcome
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> MllpReportListener:
        self._thread = threading.Thread(target=self._run, name="mllp-listener", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError(f"MLLP listener could not listen on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                start_hl7_server(self._client, self.host, self.port, limit=MAX_MESSAGE_BYTES))
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

    async def _client(self, reader, writer) -> None:
        peer = "{}:{}".format(*writer.get_extra_info("peername")[:2])
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    # readuntil, not readblock: a block without its start character must still be kept.
                    block = await reader.readuntil(END_BLOCK + CARRIAGE_RETURN)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        log.warning("MLLP: %s closed the connection inside a message (%d bytes)", peer,
                                    len(exc.partial))
                    return
                except asyncio.LimitOverrunError:
                    log.warning("MLLP: message from %s over %d bytes; closing the connection", peer,
                                MAX_MESSAGE_BYTES)
                    return
                raw = block[:-2]
                raw = raw[raw.index(START_BLOCK) + 1:] if START_BLOCK in raw else raw
                ack, outcome = await loop.run_in_executor(None, self.intake.handle, raw, peer)
                writer.writeblock(ack)
                await writer.drain()
                if self.on_outcome is not None:
                    self.on_outcome(outcome)
        finally:
            writer.close()


async def _send(host: str, port: int, messages: list[bytes], timeout: float) -> list[str]:
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port), timeout)
    acks = []
    try:
        for message in messages:
            writer.writeblock(message)
            await writer.drain()
            acks.append((await asyncio.wait_for(reader.readblock(), timeout)).decode("utf-8", "replace"))
    finally:
        writer.close()
    return acks


def send_messages(host: str, port: int, messages: list[bytes | str], timeout: float = 30.0) -> list[str]:
    """Send HL7 messages over one MLLP connection; returns each ACK's text. For tools and tests."""
    encoded = [m.encode("utf-8") if isinstance(m, str) else m for m in messages]
    return asyncio.run(_send(host, port, encoded, timeout))


def ack_code(ack_text: str) -> str:
    """MSA-1 of an ACK's text."""
    for segment in ack_text.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            return segment.split(segment[3:4] or "|")[1]
    raise ValueError(f"no MSA segment in {ack_text[:80]!r}")
