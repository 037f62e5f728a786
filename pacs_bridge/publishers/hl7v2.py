"""HL7 v2 order update over MLLP: an order-change message (ORM^O01 or OMI^O23, ORC-1 ``XO``) carrying the new
priority, sent to the RIS or the interface engine that feeds the reading worklist.

Where the priority goes (dicom-results.md §5): TQ1-9 from v2.5 on; ORC-7.6 and OBR-27.6 in older versions, and
also in 2.5 messages when ``legacy_priority_fields`` is set (many RIS still read OBR-27). The order is
identified by the accession number as filler order number (ORC-3, OBR-3, OBR-18) and, for OMI, IPC-1; the
Study Instance UID travels in IPC-3 (OMI) or a ZDS segment (ORM, as IHE Scheduled Workflow does). An NTE
segment says what was changed, from which value and why.

HL7 v2 cannot be asked for an order's current priority, so the value the worker last set or saw for the study
is the current one; when there is none, only the highest value (S) is sent, since nothing can be lowered by it
(``when_current_unknown``). The receiver's ACK decides: MSA-1 ``AA``/``CA`` is success, anything else a
refusal. The message goes out over python-hl7's MLLP streams (:mod:`hl7.mllp`), which frame it and read the
ACK's block; ``timeout_s`` bounds the connection and the wait for the ACK.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection

from pacs_bridge.publishers.base import PriorityRaiser, PriorityScale, PriorityUpdate, PublisherError, Target

MESSAGE_TYPES = {"ORM^O01": "ORM^O01^ORM_O01", "OMI^O23": "OMI^O23^OMI_O23"}
ACCEPTED = ("AA", "CA")


def escape(text: str | None) -> str:
    """A value made safe for one HL7 field with the default delimiters (|^~\\&), on one line."""
    text = " ".join(str(text or "").split())
    return (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
            .replace("~", "\\R\\"))


def segment(name: str, fields: dict[int, str]) -> str:
    """A segment from {field number: already-encoded value}; MSH numbering counts the field separator as 1."""
    if not fields:
        return name
    last = max(fields)
    if name == "MSH":
        values = [fields.get(n, "") for n in range(2, last + 1)]
    else:
        values = [fields.get(n, "") for n in range(1, last + 1)]
    return "|".join([name, *values])


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        raise ValueError(f"HL7 version {text!r} is not like 2.5.1") from None


class Hl7OrderPublisher(PriorityRaiser):
    kind = "hl7v2"
    default_scale: ClassVar[Mapping[str, Any]] = {
        "levels": {"routine": "R", "urgent": "A", "stat": "S"},
        # HL7 tables 0027/0485: timing-critical T ranks with ASAP; preop and callback above routine.
        "ranks": {"PRN": 0, "R": 0, "P": 1, "C": 1, "T": 2, "A": 2, "S": 3}}

    def __init__(self, name: str, host: str, port: int, scale: PriorityScale, *, timeout_s: float = 5.0,
                 when_current_unknown: str = "top_only", message: str = "ORM^O01", version: str = "2.5.1",
                 legacy_priority_fields: bool = True, sending_application: str = "TRIAGE",
                 sending_facility: str = "", receiving_application: str = "",
                 receiving_facility: str = "") -> None:
        super().__init__(name, scale, timeout_s, when_current_unknown)
        if message not in MESSAGE_TYPES:
            raise ValueError(f"publisher {name!r}: message must be one of {sorted(MESSAGE_TYPES)}, "
                             f"not {message!r}")
        self.host, self.port = host, int(port)
        self.message = message
        self.version = version
        self._version_tuple = _version(version)
        self.legacy_priority_fields = legacy_priority_fields
        self.sending = (sending_application, sending_facility)
        self.receiving = (receiving_application, receiving_facility)

    def find_targets(self, update: PriorityUpdate, last_known: str | None) -> list[Target]:
        if not update.accession_number:
            return []  # without the order's number the RIS cannot match the update to an order
        return [Target(update.accession_number, last_known)]

    def set_priority(self, target: Target, value: str, update: PriorityUpdate, note: str) -> None:
        self.send(self.build_message(update, value, note))

    # -- the message ----------------------------------------------------------------------------------------
    def build_message(self, update: PriorityUpdate, value: str, note: str,
                      control_id: str | None = None) -> str:
        now = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
        control_id = control_id or uuid.uuid4().hex[:20]
        accession = escape(update.accession_number)
        priority = escape(value)
        modern = self._version_tuple >= (2, 5)
        legacy = self.legacy_priority_fields or not modern
        timing = f"^^^^^{priority}" if legacy else ""
        segments = [
            segment("MSH", {2: "^~\\&", 3: escape(self.sending[0]), 4: escape(self.sending[1]),
                            5: escape(self.receiving[0]), 6: escape(self.receiving[1]), 7: now,
                            9: MESSAGE_TYPES[self.message], 10: control_id, 11: "P", 12: escape(self.version),
                            18: "UNICODE UTF-8"}),
            segment("PID", {1: "1", 3: escape(update.patient_id)}),
            segment("ORC", {1: "XO", 3: accession, 7: timing, 9: now}),
        ]
        if modern:
            segments.append(segment("TQ1", {1: "1", 9: priority}))
        service = f"^{escape(update.study_description)}" if update.study_description else ""
        segments.append(segment("OBR", {1: "1", 3: accession, 4: service, 18: accession, 27: timing}))
        segments.append(segment("NTE", {1: "1", 2: "L", 3: escape(note)}))
        if self.message == "OMI^O23":
            segments.append(segment("IPC", {1: accession, 3: escape(update.study_instance_uid)}))
        else:
            segments.append(segment("ZDS", {1: f"{escape(update.study_instance_uid)}^^Application^DICOM"}))
        return "\r".join(segments) + "\r"

    # -- MLLP -----------------------------------------------------------------------------------------------
    def send(self, message: str) -> str:
        """Send one message over MLLP and return MSA-1 of the ACK; a refusal or no ACK raises."""
        where = f"MLLP {self.host}:{self.port}"
        try:
            block = asyncio.run(_exchange(self.host, self.port, message, self.timeout_s))
        except asyncio.IncompleteReadError as exc:
            raise PublisherError(f"{where}: connection closed before an ACK arrived") from exc
        except TimeoutError as exc:
            raise PublisherError(f"{where}: no connection or no ACK within {self.timeout_s:g}s") from exc
        except OSError as exc:  # refused, unreachable
            raise PublisherError(f"{where}: {type(exc).__name__}: {exc}") from exc
        except InvalidBlockError as exc:
            raise PublisherError(f"{where}: the answer is not an MLLP block: {exc}") from exc
        text = block.decode("utf-8", "replace")
        try:
            ack = hl7.parse(text.replace("\n", "\r"))
            code = str(ack.segment("MSA")[1])
            detail = str(ack.segment("MSA")[3]) if len(ack.segment("MSA")) > 3 else ""
        except (KeyError, IndexError, ValueError, hl7.HL7Exception) as exc:
            raise PublisherError(f"{where}: the answer is not an HL7 ACK: {text[:120]!r}") from exc
        if code not in ACCEPTED:
            because = f": {detail}" if detail else ""
            raise PublisherError(f"{where}: order update refused with {code}{because}")
        return code


async def _exchange(host: str, port: int, message: str, timeout_s: float) -> bytes:
    """Send ``message`` in one MLLP block on a new connection; the answer's block, unframed."""
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port, encoding="utf-8"), timeout_s)
    try:
        writer.writemessage(message)
        await writer.drain()
        return await asyncio.wait_for(reader.readblock(), timeout_s)
    finally:
        writer.close()
