"""HL7 v2 ORU^R01 messages, an MLLP socket client and a report database for the HL7 intake tests."""
from __future__ import annotations

import socket
from datetime import UTC, datetime

from sqlalchemy import insert

from pacs_bridge.study_attributes import DEFAULT_POSTCODE_TABLE, AttributePolicy, PostcodeTable
from sql.schema import studies

POLICY = AttributePolicy(timezone="Europe/London", postcodes=PostcodeTable.load(DEFAULT_POSTCODE_TABLE))


STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"


def oru(control_id: str = "MSG0001", accession: str = "ACC1001", text: str | None = None,
        observed: str = "20260105090000", reported: str = "20260106143000", status: str = "F",
        extra: str = "") -> str:
    text = text or ("Acute left subdural hematoma measuring 8 mm.~There is no midline shift.~"
                    "Possible small contusion in the left temporal lobe.")
    segments = [
        f"MSH|^~\\&|RIS|GENERAL|TRIAGE|GENERAL|{reported}||ORU^R01^ORU_R01|{control_id}|P|2.5|||||||UNICODE UTF-8",
        ("PID|1||MRN123^^^GENERAL^MR||DOE^JANE||19580304|F|||1 High St^^Northtown^^QN1 2AB^GBR"
         "|||||||||||W^White^HL70189"),
        "PV1|1|O|MRI^^^GENERAL|||||||||||||||||PUBLIC",
        f"ORC|RE|ORD1001|{accession}",
        (f"OBR|1|ORD1001|{accession}|70553^MRI BRAIN WO AND W CONTRAST^CPT|||{observed}|||||||||||{accession}"
         f"||||{reported}|||{status}"),
        f"OBX|1|TX|18782-3^Radiology Study observation^LN||{text}||||||{status}",
    ]
    return "\r".join(segments + ([extra] if extra else [])) + "\r"


class MllpClient:
    """A plain socket client speaking MLLP framing (start block VT, end block FS CR), as an interface engine does."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""

    def send(self, message: str | bytes, framed: bool = True) -> str:
        payload = message.encode() if isinstance(message, str) else message
        self.sock.sendall(b"\x0b" + payload + b"\x1c\r" if framed else payload + b"\x1c\r")
        while b"\x1c\r" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the listener closed the connection")
            self.buffer += chunk
        block, self.buffer = self.buffer.split(b"\x1c\r", 1)
        assert block.startswith(b"\x0b"), block[:20]
        return block[1:].decode()

    def close(self) -> None:
        self.sock.close()


def msa(ack: str) -> list[str]:
    segment = next(s for s in ack.split("\r") if s.startswith("MSA"))
    return segment.split("|")


def add_study(engine, uid: str = STUDY_UID, accession: str = "ACC1001") -> None:
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(insert(studies).values(study_instance_uid=uid, accession_number=accession, status="done",
                                                  version=1, instance_count=1, first_received_at=now,
                                                  last_received_at=now))
