"""UPS-RS: the workitem's Scheduled Procedure Step Priority (0074,1200), over DICOMweb (PS3.18 §11).

The study's workitems are found with a search (``GET {base}/workitems?...``, PS3.18 §11.9) on the order's
Accession Number or Study Instance UID inside the Referenced Request Sequence (0040,A370), and each one that
is still SCHEDULED is updated (``POST {base}/workitems/{uid}``, §11.6) with a dataset holding only the new
priority. An IN PROGRESS workitem belongs to its performer (an update needs its transaction UID, PS3.4 CC.2.6)
and is left alone, as are COMPLETED and CANCELED ones. Results a server returns for a search key it ignored
are checked against the study again before anything is changed, so an unrelated workitem is never touched.

With ``create_if_missing`` a study without a workitem gets one (``POST {base}/workitems?{uid}``, §11.4).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydicom.uid import generate_uid

from pacs_bridge.publishers.base import PriorityRaiser, PriorityScale, PriorityUpdate, PublisherError, Target
from pacs_bridge.publishers.http import HttpClient

DICOM_JSON = "application/dicom+json"
# Tags, as DICOM JSON keys.
PRIORITY = "00741200"             # Scheduled Procedure Step Priority, CS: HIGH | MEDIUM | LOW
STATE = "00741000"                # Procedure Step State, CS: SCHEDULED | IN PROGRESS | COMPLETED | CANCELED
REFERENCED_REQUEST = "0040A370"   # Referenced Request Sequence
STUDY_UID = "0020000D"
ACCESSION = "00080050"
SOP_INSTANCE_UID = "00080018"
INPUT_INFORMATION = "00404021"    # Input Information Sequence
LABEL = "00741204"                # Procedure Step Label
WORKLIST_LABEL = "00741202"       # Worklist Label
START = "00404005"                # Scheduled Procedure Step Start DateTime
COMMENTS = "00400400"             # Comments on the Scheduled Procedure Step

SEARCH_KEYS = {
    "accession": "ReferencedRequestSequence.AccessionNumber",
    "study": "ReferencedRequestSequence.StudyInstanceUID",
}


def _value(item: Mapping[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _items(item: Mapping[str, Any], tag: str) -> list[Mapping[str, Any]]:
    return list((item.get(tag) or {}).get("Value") or [])


def workitem_matches(item: Mapping[str, Any], update: PriorityUpdate) -> bool:
    """Whether a workitem found by a search belongs to the study (by accession or Study Instance UID)."""
    if _value(item, STUDY_UID) == update.study_instance_uid:
        return True
    for request in _items(item, REFERENCED_REQUEST):
        if _value(request, STUDY_UID) == update.study_instance_uid:
            return True
        if update.accession_number and _value(request, ACCESSION) == update.accession_number:
            return True
    return any(_value(entry, STUDY_UID) == update.study_instance_uid
               for entry in _items(item, INPUT_INFORMATION))


class UpsRsPublisher(PriorityRaiser):
    kind = "ups_rs"
    default_scale: ClassVar[Mapping[str, Any]] = {
        "levels": {"routine": "LOW", "urgent": "MEDIUM", "stat": "HIGH"},
        "ranks": {"LOW": 0, "MEDIUM": 1, "HIGH": 2}}

    def __init__(self, name: str, url: str, scale: PriorityScale, *, timeout_s: float = 5.0,
                 when_current_unknown: str = "top_only", match: str = "accession",
                 create_if_missing: bool = False, worklist_label: str = "", token: str | None = None) -> None:
        super().__init__(name, scale, timeout_s, when_current_unknown)
        if match not in SEARCH_KEYS:
            raise ValueError(f"publisher {name!r}: match must be one of {sorted(SEARCH_KEYS)}, not {match!r}")
        self.base = url.rstrip("/")
        self.match = match
        self.create_if_missing = create_if_missing
        self.worklist_label = worklist_label
        self.http = HttpClient(timeout_s, token)

    def _search(self, update: PriorityUpdate) -> list[dict[str, Any]]:
        by_accession = self.match == "accession" and update.accession_number
        key = SEARCH_KEYS["accession" if by_accession else "study"]
        value = update.accession_number if by_accession else update.study_instance_uid
        response = self.http.request("GET", f"{self.base}/workitems", ok=(200, 204),
                                     params={key: value, "includefield": "all"},
                                     headers={"Accept": DICOM_JSON})
        if response.status_code == 204 or not response.content:
            return []
        try:
            found = response.json()
        except json.JSONDecodeError as exc:
            raise PublisherError(f"GET {self.base}/workitems: the answer is not DICOM JSON: {exc}") from exc
        return [item for item in found if isinstance(item, dict) and workitem_matches(item, update)]

    def find_targets(self, update: PriorityUpdate, last_known: str | None) -> list[Target]:
        targets = []
        for item in self._search(update):
            uid = _value(item, SOP_INSTANCE_UID)
            if not uid:
                continue
            state = (_value(item, STATE) or "").upper()
            closed = None
            if state == "IN PROGRESS":
                closed = "workitem is IN PROGRESS: its performer holds the transaction, so it is not changed"
            elif state in ("COMPLETED", "CANCELED"):
                closed = f"workitem is {state}"
            targets.append(Target(uid, _value(item, PRIORITY), item, closed))
        return targets

    def set_priority(self, target: Target, value: str, update: PriorityUpdate, note: str) -> None:
        body = [{PRIORITY: {"vr": "CS", "Value": [value]}}]
        self.http.request("POST", f"{self.base}/workitems/{target.id}", ok=(200, 204),
                          content=json.dumps(body),
                          headers={"Content-Type": DICOM_JSON, "Accept": DICOM_JSON})

    def create_target(self, update: PriorityUpdate, value: str, note: str) -> str | None:
        if not self.create_if_missing:
            return None
        uid = generate_uid(entropy_srcs=["triage-ups", update.study_instance_uid])
        request: dict[str, Any] = {STUDY_UID: {"vr": "UI", "Value": [update.study_instance_uid]}}
        if update.accession_number:
            request[ACCESSION] = {"vr": "SH", "Value": [update.accession_number]}
        now = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
        dataset = {
            SOP_INSTANCE_UID: {"vr": "UI", "Value": [uid]},
            STATE: {"vr": "CS", "Value": ["SCHEDULED"]},
            PRIORITY: {"vr": "CS", "Value": [value]},
            LABEL: {"vr": "LO", "Value": [(update.study_description or "Read study")[:64]]},
            WORKLIST_LABEL: {"vr": "LO", "Value": [self.worklist_label or "AI triage"]},
            START: {"vr": "DT", "Value": [now]},
            COMMENTS: {"vr": "LT", "Value": [note[:10240]]},
            REFERENCED_REQUEST: {"vr": "SQ", "Value": [request]},
            INPUT_INFORMATION: {"vr": "SQ", "Value": [{STUDY_UID: {"vr": "UI",
                                                                   "Value": [update.study_instance_uid]}}]},
        }
        # The workitem's UID is the whole query string (PS3.18 §11.4: workitems?{workitem}).
        self.http.request("POST", f"{self.base}/workitems?{uid}", ok=(200, 201),
                          content=json.dumps([dataset]),
                          headers={"Content-Type": DICOM_JSON, "Accept": DICOM_JSON})
        return uid
