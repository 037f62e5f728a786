"""Worklist publishers against receivers written for the tests: a real MLLP socket server standing in for the
RIS, and a real HTTP server holding UPS workitems (UPS-RS), FHIR ServiceRequests and a webhook endpoint.

The rule under test throughout: a publisher only ever raises a study's priority, never lowers one (a
clinician's STAT stays STAT), and every decision is recorded with the value it found and the AI's reason.
"""
from __future__ import annotations

import copy
import hashlib
import hmac
import json
import socketserver
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import hl7
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import insert, select

from pacs_bridge.publishers import (
    FAILED,
    RAISED,
    REVERTED,
    SKIPPED,
    UNCHANGED,
    Hl7OrderPublisher,
    PriorityScale,
    PriorityUpdate,
    PublisherConfigError,
    build_publishers,
)
from pacs_bridge.results import Finding, TriageResult
from sql.schema import events, predictions, processing_runs, studies, utcnow
from tests.support.processes import free_port, wait_for
from tests.support.studies import ingest
from worker.config import load_settings
from worker.publishing import last_known_values, publish_result, revert

ACCESSION = "ACC4711"
SECRET = "webhook-secret-for-tests"


# --- the receivers ----------------------------------------------------------------------------------------

class MllpListener:
    """A RIS's MLLP port: every framed message is kept and answered with an ACK (``ack_code``)."""

    def __init__(self, ack_code: str = "AA", port: int = 0) -> None:
        self.messages: list[hl7.Message] = []
        self.ack_code = ack_code
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buffer = b""
                while True:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    while b"\x1c\r" in buffer:
                        block, buffer = buffer.split(b"\x1c\r", 1)
                        message = hl7.parse(block.lstrip(b"\x0b").decode("utf-8"))
                        listener.messages.append(message)
                        ack = message.create_ack(listener.ack_code, application="RIS", facility="GENERAL")
                        self.request.sendall(b"\x0b" + str(ack).encode() + b"\x1c\r")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def dicom_value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


@dataclass
class FakeRis:
    """UPS-RS under /dicom-web, FHIR under /fhir, a webhook at /hook: what a RIS and a pager would hold."""

    workitems: dict[str, dict] = field(default_factory=dict)
    service_requests: dict[str, dict] = field(default_factory=dict)
    requests: list[tuple[str, str, dict, bytes]] = field(default_factory=list)
    #: When True, the UPS search ignores its keys and answers every workitem (as some servers do).
    ignore_search_keys: bool = False
    #: Called after each FHIR search: a clinician acting between the publisher's read and its write.
    after_fhir_search: object = None

    def add_workitem(self, study_uid: str, accession: str, priority: str, state: str = "SCHEDULED") -> str:
        uid = generate_uid()
        self.workitems[uid] = {
            "00080018": {"vr": "UI", "Value": [uid]},
            "00741000": {"vr": "CS", "Value": [state]},
            "00741200": {"vr": "CS", "Value": [priority]},
            "0040A370": {"vr": "SQ", "Value": [{"0020000D": {"vr": "UI", "Value": [study_uid]},
                                                 "00080050": {"vr": "SH", "Value": [accession]}}]},
        }
        return uid

    def add_service_request(self, accession: str, priority: str | None, status: str = "active") -> str:
        rid = str(len(self.service_requests) + 1)
        resource = {"resourceType": "ServiceRequest", "id": rid, "meta": {"versionId": "1"}, "status": status,
                    "intent": "order", "identifier": [{"system": "urn:acc", "value": accession}],
                    "subject": {"reference": "Patient/1"}}
        if priority:
            resource["priority"] = priority
        self.service_requests[rid] = resource
        return rid

    def priority(self, workitem_uid: str) -> str:
        return dicom_value(self.workitems[workitem_uid], "00741200")

    def calls(self, method: str, prefix: str) -> list[tuple[str, str, dict, bytes]]:
        return [r for r in self.requests if r[0] == method and r[1].startswith(prefix)]

    # -- HTTP ---------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        self.requests.append((method, path, headers, body))
        url = urllib.parse.urlsplit(path)
        if url.path == "/hook" and method == "POST":
            return 204, {}, b""
        if url.path.startswith("/dicom-web/workitems"):
            return self._ups(method, url, headers, body)
        if url.path.startswith("/fhir/ServiceRequest"):
            return self._fhir(method, url, headers, body)
        return 404, {}, b""

    def _ups(self, method, url, headers, body):
        rest = url.path[len("/dicom-web/workitems"):].strip("/")
        if method == "GET" and not rest:
            query = urllib.parse.parse_qs(url.query)
            found = []
            for item in self.workitems.values():
                request = dicom_value(item, "0040A370") or {}
                ok = all(
                    (key == "ReferencedRequestSequence.AccessionNumber"
                     and dicom_value(request, "00080050") == v[0])
                    or (key == "ReferencedRequestSequence.StudyInstanceUID"
                        and dicom_value(request, "0020000D") == v[0])
                    or key == "includefield"
                    for key, v in query.items())
                if ok or self.ignore_search_keys:
                    found.append(item)
            if not found:
                return 204, {}, b""
            return 200, {"Content-Type": "application/dicom+json"}, json.dumps(found).encode()
        if headers.get("content-type") != "application/dicom+json":
            return 415, {}, b""
        if method == "POST" and not rest:  # create: workitems?{uid}
            uid = url.query
            [dataset] = json.loads(body)
            if uid in self.workitems or dicom_value(dataset, "00741000") != "SCHEDULED":
                return 409, {}, b""
            self.workitems[uid] = dataset
            return 201, {"Location": f"/dicom-web/workitems/{uid}"}, b""
        if method == "POST" and rest in self.workitems:  # update
            item = self.workitems[rest]
            if dicom_value(item, "00741000") != "SCHEDULED" and "transaction" not in url.query:
                return 409, {"Warning": "299 Workitem is IN PROGRESS; Transaction UID required"}, b""
            [changes] = json.loads(body)
            item.update(changes)
            return 200, {}, b""
        return 404, {}, b""

    def _fhir(self, method, url, headers, body):
        rest = url.path[len("/fhir/ServiceRequest"):].strip("/")
        if method == "GET" and not rest:
            wanted = urllib.parse.parse_qs(url.query)["identifier"][0]
            system, _, value = wanted.rpartition("|")
            entries = [{"resource": r, "search": {"mode": "match"}} for r in self.service_requests.values()
                       if any(i["value"] == value and (not system or i["system"] == system)
                              for i in r["identifier"])]
            bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
            if self.after_fhir_search:
                self.after_fhir_search()
            return 200, {"Content-Type": "application/fhir+json"}, json.dumps(bundle).encode()
        resource = self.service_requests.get(rest)
        if resource is None:
            return 404, {}, b""
        if headers.get("if-match") not in (None, f'W/"{resource["meta"]["versionId"]}"'):
            return 412, {}, b""
        if method == "PATCH":
            if headers.get("content-type") != "application/json-patch+json":
                return 415, {}, b""
            changed = copy.deepcopy(resource)
            for op in json.loads(body):
                key = op["path"].strip("/").split("/")
                if op["op"] == "test" and changed.get(key[0]) != op["value"]:
                    return 422, {}, b'{"resourceType":"OperationOutcome"}'
                if op["op"] in ("add", "replace"):
                    if key[1:] == ["-"]:
                        changed[key[0]].append(op["value"])
                    else:
                        changed[key[0]] = op["value"]
        elif method == "PUT":
            changed = json.loads(body)
        else:
            return 405, {}, b""
        changed["meta"] = {"versionId": str(int(resource["meta"]["versionId"]) + 1)}
        self.service_requests[rest] = changed
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(changed).encode()


@pytest.fixture
def ris():
    state = FakeRis()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            code, out_headers, out = state.handle(self.command, self.path, headers, body)
            self.send_response(code)
            for k, v in out_headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PATCH = do_PUT = _serve

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def mllp():
    listener = MllpListener()
    yield listener
    listener.close()


# --- the bookkeeping side ---------------------------------------------------------------------------------

def configure(tmp_path: Path, database_url: str, publishers: list[dict], **publishing) -> object:
    (tmp_path / "hook.secret").write_text(SECRET)
    settings = load_settings(environ={})
    settings.var_dir, settings.publishers = tmp_path / "var", publishers
    settings.database.url = database_url
    for key, value in publishing.items():
        setattr(settings.publishing, key, value)
    return settings


def every_publisher(ris: FakeRis, mllp: MllpListener, tmp_path: Path) -> list[dict]:
    return [
        {"name": "ups", "kind": "ups_rs", "url": f"{ris.url}/dicom-web"},
        {"name": "ris", "kind": "hl7v2", "host": "127.0.0.1", "port": mllp.port,
         "receiving_application": "RIS"},
        {"name": "orders", "kind": "fhir", "url": f"{ris.url}/fhir", "identifier_system": "urn:acc"},
        {"name": "pager", "kind": "webhook", "url": f"{ris.url}/hook",
         "secret_file": str(tmp_path / "hook.secret")},
    ]


def processed_study(engine, accession: str | None = ACCESSION, version: int = 1, study_uid: str | None = None
                    ) -> tuple[str, int]:
    """A study and a finished run, as the pipeline leaves them before publishing."""
    now = utcnow()
    with engine.begin() as c:
        if study_uid is None:
            study_uid = generate_uid()
            study_id = c.execute(insert(studies).values(
                study_instance_uid=study_uid, accession_number=accession, study_description="MRI BRAIN",
                status="processing", version=version, instance_count=1, first_received_at=now,
                last_received_at=now)).inserted_primary_key[0]
        else:
            study_id = c.execute(select(studies.c.id)
                                 .where(studies.c.study_instance_uid == study_uid)).scalar()
        run_id = c.execute(insert(processing_runs).values(
            study_id=study_id, study_version=version, pipeline="neuro_mri", status="running", attempts=1,
        )).inserted_primary_key[0]
    return study_uid, run_id


def result(study_uid: str, priority: str) -> TriageResult:
    findings = {
        "stat": (Finding("trauma_subdural_hematoma", 0.97, 0.41),
                 Finding("structural_mass_effect", 0.61, 0.5)),
        "urgent": (Finding("tumor_adult_meningioma", 0.72, 0.4),),
        "routine": (Finding("structural_cerebral_atrophy", 0.12, 0.5),),
    }[priority]
    return TriageResult(study_instance_uid=study_uid, priority=priority, findings=findings,
                        referrals=("neurosurgery",) if priority == "stat" else (), model_name="prima",
                        model_version="1.0.7+tiny")


def recorded(engine, study_uid: str) -> dict[str, list[dict]]:
    with engine.connect() as c:
        rows = c.execute(select(events.c.reason, events.c.detail)
                         .where(events.c.kind == "publication", events.c.study_instance_uid == study_uid)
                         .order_by(events.c.id)).all()
    out: dict[str, list[dict]] = {}
    for reason, detail in rows:
        out.setdefault(detail["publisher"], []).append({**detail, "reason": reason})
    return out


# --- acceptance: the priority reaches every worklist, and never goes down -----------------------------------

def test_a_stat_result_raises_the_priority_in_every_worklist_and_records_the_original(
        tmp_path, engine, postgres_url, ris, mllp):
    study_uid, run_id = processed_study(engine)
    workitem = ris.add_workitem(study_uid, ACCESSION, "LOW")
    order = ris.add_service_request(ACCESSION, "routine")
    settings = configure(tmp_path, postgres_url, every_publisher(ris, mllp, tmp_path),
                         worklist_url="https://triage.example.org/worklist")

    done = publish_result(settings, engine, run_id, result(study_uid, "stat"))

    assert {p.publisher: p.action for p in done} == {"ups": RAISED, "ris": RAISED, "orders": RAISED,
                                                     "pager": "notified"}
    assert ris.priority(workitem) == "HIGH"
    assert ris.service_requests[order]["priority"] == "stat"
    assert "trauma_subdural_hematoma 0.97" in ris.service_requests[order]["note"][0]["text"]

    [message] = mllp.messages
    assert str(message.segment("MSH")[9]) == "ORM^O01^ORM_O01"
    assert str(message.segment("ORC")[1]) == "XO" and str(message.segment("ORC")[3]) == ACCESSION
    assert str(message.segment("TQ1")[9]) == "S"
    assert str(message.segment("OBR")[27]) == "^^^^^S"
    assert str(message.segment("ZDS")[1]).startswith(study_uid)
    assert "trauma_subdural_hematoma 0.97" in str(message.segment("NTE")[3])

    [(_, _, headers, body)] = ris.calls("POST", "/hook")
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-triage-signature"] == f"sha256={expected}"
    hook = json.loads(body)
    assert (hook["priority"], hook["accession_number"]) == ("stat", ACCESSION)
    assert hook["worklist_url"] == f"https://triage.example.org/worklist/study?uid={study_uid}"

    books = recorded(engine, study_uid)
    assert [(d["original"], d["new"]) for d in books["ups"]] == [("LOW", "HIGH")]
    assert [(d["original"], d["new"]) for d in books["orders"]] == [("routine", "stat")]
    assert [(d["original"], d["new"]) for d in books["ris"]] == [(None, "S")]  # HL7 cannot be asked
    for detail in books["ups"] + books["ris"] + books["orders"]:
        assert detail["run_id"] == run_id and detail["target"]
        assert detail["ai_reason"].startswith("AI priority stat (trauma_subdural_hematoma 0.97")
    assert "LOW -> HIGH" in books["ups"][0]["reason"]


@pytest.mark.parametrize("ai_priority", ["routine", "urgent"])
def test_a_lower_ai_priority_never_lowers_a_clinicians_stat(ai_priority, tmp_path, engine, postgres_url, ris,
                                                            mllp):
    study_uid, run_id = processed_study(engine)
    workitem = ris.add_workitem(study_uid, ACCESSION, "HIGH")
    order = ris.add_service_request(ACCESSION, "stat")
    settings = configure(tmp_path, postgres_url, every_publisher(ris, mllp, tmp_path))

    done = publish_result(settings, engine, run_id, result(study_uid, ai_priority))

    assert ris.priority(workitem) == "HIGH" and ris.service_requests[order]["priority"] == "stat"
    assert ris.calls("POST", "/dicom-web/workitems/") == [] and ris.calls("PATCH", "/fhir") == []
    assert mllp.messages == []  # the RIS's order is unknown to us: only S could be sent blind
    assert ris.calls("POST", "/hook") == []
    actions = {p.publisher: p.action for p in done}
    assert actions == {"ups": UNCHANGED, "orders": UNCHANGED, "ris": UNCHANGED, "pager": SKIPPED}
    books = recorded(engine, study_uid)
    assert books["ups"][0]["original"] == "HIGH" and "never lowered" in books["ups"][0]["reason"]
    assert books["orders"][0]["original"] == "stat"


def test_a_revised_result_never_lowers_the_priority_the_first_one_raised(tmp_path, engine, postgres_url, ris,
                                                                          mllp):
    study_uid, first_run = processed_study(engine)
    workitem = ris.add_workitem(study_uid, ACCESSION, "MEDIUM")
    settings = configure(tmp_path, postgres_url, every_publisher(ris, mllp, tmp_path))
    publish_result(settings, engine, first_run, result(study_uid, "stat"))
    _, second_run = processed_study(engine, version=2, study_uid=study_uid)

    done = publish_result(settings, engine, second_run, result(study_uid, "urgent"))

    assert ris.priority(workitem) == "HIGH"
    assert len(mllp.messages) == 1  # the S sent for the first result; the order is known to be S now
    assert len(ris.calls("POST", "/hook")) == 1
    assert {p.publisher: p.action for p in done} == {"ups": UNCHANGED, "ris": UNCHANGED, "orders": SKIPPED,
                                                     "pager": SKIPPED}
    assert last_known_values(engine, study_uid)["ris"] == "S"


def test_hl7_sends_an_urgent_raise_only_once_the_order_is_known_to_be_routine(tmp_path, engine, postgres_url,
                                                                              mllp):
    study_uid, run_id = processed_study(engine)
    settings = configure(tmp_path, postgres_url, [{"name": "ris", "kind": "hl7v2", "host": "127.0.0.1",
                                                   "port": mllp.port, "message": "OMI^O23"}])
    [unknown] = publish_result(settings, engine, run_id, result(study_uid, "urgent"))
    assert unknown.action == UNCHANGED and "might lower it" in unknown.reason and mllp.messages == []

    publisher = build_publishers(settings.publishers, settings.publishing.model_dump())[0]
    [known] = publisher.publish(PriorityUpdate(study_uid, "urgent", "AI priority urgent", ACCESSION), "R")

    assert known.action == RAISED and (known.original, known.new) == ("R", "A")
    [message] = mllp.messages
    assert str(message.segment("MSH")[9]) == "OMI^O23^OMI_O23" and str(message.segment("TQ1")[9]) == "A"
    assert str(message.segment("IPC")[1]) == ACCESSION and str(message.segment("IPC")[3]) == study_uid


def test_workitems_in_progress_or_completed_and_of_other_studies_are_left_alone(tmp_path, engine,
                                                                               postgres_url, ris):
    study_uid, run_id = processed_study(engine)
    scheduled = ris.add_workitem(study_uid, ACCESSION, "LOW")
    in_progress = ris.add_workitem(study_uid, ACCESSION, "LOW", state="IN PROGRESS")
    completed = ris.add_workitem(study_uid, ACCESSION, "LOW", state="COMPLETED")
    other_study = ris.add_workitem(generate_uid(), "ACC0001", "LOW")
    ris.ignore_search_keys = True  # the server answers every workitem: the publisher must check them itself
    settings = configure(tmp_path, postgres_url, [{"name": "ups", "kind": "ups_rs",
                                                   "url": f"{ris.url}/dicom-web"}])

    done = publish_result(settings, engine, run_id, result(study_uid, "stat"))

    assert {p.target: p.action for p in done} == {scheduled: RAISED, in_progress: SKIPPED, completed: SKIPPED}
    assert [ris.priority(uid) for uid in (scheduled, in_progress, completed, other_study)] == \
        ["HIGH", "LOW", "LOW", "LOW"]


def test_a_study_without_a_workitem_gets_one_when_configured(tmp_path, engine, postgres_url, ris):
    study_uid, run_id = processed_study(engine)
    settings = configure(tmp_path, postgres_url, [{"name": "ups", "kind": "ups_rs",
                                                   "url": f"{ris.url}/dicom-web", "create_if_missing": True,
                                                   "worklist_label": "Neuro"}])

    [created] = publish_result(settings, engine, run_id, result(study_uid, "urgent"))

    assert created.action == "created" and created.new == "MEDIUM"
    item = ris.workitems[created.target]
    assert dicom_value(item, "00741200") == "MEDIUM" and dicom_value(item, "00741202") == "Neuro"
    assert dicom_value(dicom_value(item, "0040A370"), "00080050") == ACCESSION


def test_a_raise_can_be_reverted_unless_someone_changed_the_priority_since(tmp_path, engine, postgres_url,
                                                                          ris):
    study_uid, run_id = processed_study(engine)
    workitem = ris.add_workitem(study_uid, ACCESSION, "LOW")
    order = ris.add_service_request(ACCESSION, None)  # no priority: routine, by FHIR's definition
    settings = configure(tmp_path, postgres_url, [
        {"name": "ups", "kind": "ups_rs", "url": f"{ris.url}/dicom-web"},
        {"name": "orders", "kind": "fhir", "url": f"{ris.url}/fhir", "method": "put", "add_note": False}])
    publish_result(settings, engine, run_id, result(study_uid, "stat"))
    books = recorded(engine, study_uid)
    ups_event, fhir_event = (_event_id(engine, study_uid, name) for name in ("ups", "orders"))
    assert books["orders"][0]["original"] == "routine" and ris.service_requests[order]["priority"] == "stat"
    ris.service_requests[order]["priority"] = "asap"  # a clinician changes the order after the AI did

    assert revert(settings, engine, ups_event).action == REVERTED
    kept = revert(settings, engine, fhir_event)

    assert ris.priority(workitem) == "LOW"
    assert kept.action == SKIPPED and "changed since" in kept.reason
    assert ris.service_requests[order]["priority"] == "asap"
    assert recorded(engine, study_uid)["ups"][-1]["reverts"] == ups_event


def test_the_operator_lists_publications_and_reverts_one_from_the_command_line(tmp_path, engine, postgres_url,
                                                                             ris, capsys):
    from worker.cli import main

    study_uid, run_id = processed_study(engine)
    workitem = ris.add_workitem(study_uid, ACCESSION, "MEDIUM")
    publishers = [{"name": "ups", "kind": "ups_rs", "url": f"{ris.url}/dicom-web"}]
    publish_result(configure(tmp_path, postgres_url, publishers), engine, run_id, result(study_uid, "stat"))
    config = tmp_path / "triage.yaml"
    config.write_text(json.dumps({"var_dir": str(tmp_path / "var"), "database": {"url": postgres_url},
                                  "publishers": publishers}))
    event_id = _event_id(engine, study_uid, "ups")

    assert main(["--config", str(config), "publications", "list", "--study", study_uid]) == 0
    listing = capsys.readouterr().out
    assert main(["--config", str(config), "publications", "revert", str(event_id)]) == 0
    reverted = capsys.readouterr().out

    assert f"{event_id}" in listing and "MEDIUM -> HIGH" in listing and workitem in listing
    assert f"publication {event_id}: reverted" in reverted
    assert ris.priority(workitem) == "MEDIUM"
    assert main(["--config", str(config), "publications", "revert", str(event_id + 1000)]) == 1


def test_a_publication_that_failed_while_the_ris_was_down_is_retried_by_the_operator(tmp_path, engine,
                                                                                   postgres_url, capsys):
    from worker.cli import main

    study_uid, run_id = processed_study(engine)
    with engine.begin() as c:  # the run as the pipeline finished it: its priority and what it reported
        c.execute(processing_runs.update().where(processing_runs.c.id == run_id).values(
            status="done", priority="stat", model_name="prima", model_version="1.0.7"))
        c.execute(insert(predictions), [
            {"run_id": run_id, "kind": "diagnosis", "label": "trauma_subdural_hematoma", "probability": 0.97,
             "threshold": 0.41, "reported": 1},
            {"run_id": run_id, "kind": "referral", "label": "neurosurgery", "probability": 0.8,
             "threshold": None, "reported": 1}])
    port = free_port()
    publishers = [{"name": "ris", "kind": "hl7v2", "host": "127.0.0.1", "port": port, "timeout_s": 2}]
    [down] = publish_result(configure(tmp_path, postgres_url, publishers), engine, run_id,
                            result(study_uid, "stat"))
    config = tmp_path / "triage.yaml"
    config.write_text(json.dumps({"var_dir": str(tmp_path / "var"), "database": {"url": postgres_url},
                                  "publishers": publishers}))
    listener = MllpListener(port=port)  # the RIS is back
    try:
        assert main(["--config", str(config), "publications", "retry"]) == 0
        retried = capsys.readouterr().out
        assert main(["--config", str(config), "publications", "retry"]) == 0
        again = capsys.readouterr().out
    finally:
        listener.close()

    assert down.action == FAILED
    assert "ris ACC4711: raised" in retried and again.strip() == "no failed publication to retry"
    [message] = listener.messages
    assert str(message.segment("TQ1")[9]) == "S"
    assert "trauma_subdural_hematoma 0.97" in str(message.segment("NTE")[3])
    assert recorded(engine, study_uid)["ris"][-1]["retry_of"] == _event_id(engine, study_uid, "ris", FAILED)


def _event_id(engine, study_uid: str, publisher: str, action: str = RAISED) -> int:
    with engine.connect() as c:
        rows = c.execute(select(events.c.id, events.c.detail).where(
            events.c.kind == "publication", events.c.study_instance_uid == study_uid)).all()
    return next(i for i, d in rows if d["publisher"] == publisher and d["action"] == action)


def test_a_concurrent_change_makes_the_fhir_patch_fail_instead_of_overwriting(ris):
    order = ris.add_service_request(ACCESSION, "routine")
    [publisher] = build_publishers([{"name": "orders", "kind": "fhir", "url": f"{ris.url}/fhir"}])

    def clinician_sets_stat() -> None:
        ris.service_requests[order] = {**ris.service_requests[order], "priority": "stat"}

    ris.after_fhir_search = clinician_sets_stat  # between our read and our write

    [outcome] = publisher.publish(PriorityUpdate(generate_uid(), "urgent", "AI priority urgent", ACCESSION))

    assert outcome.action == FAILED and "422" in outcome.reason
    assert ris.service_requests[order]["priority"] == "stat"


def test_an_unreachable_publisher_is_recorded_as_failed_and_the_others_still_publish(tmp_path, engine,
                                                                                      postgres_url, ris):
    study_uid, run_id = processed_study(engine)
    workitem = ris.add_workitem(study_uid, ACCESSION, "LOW")
    closed_port = free_port()
    settings = configure(tmp_path, postgres_url, [
        {"name": "ris", "kind": "hl7v2", "host": "127.0.0.1", "port": closed_port, "timeout_s": 1},
        {"name": "ups", "kind": "ups_rs", "url": f"{ris.url}/dicom-web"}])

    done = publish_result(settings, engine, run_id, result(study_uid, "stat"))

    assert {p.publisher: p.action for p in done} == {"ris": FAILED, "ups": RAISED}
    assert ris.priority(workitem) == "HIGH"
    assert f"127.0.0.1:{closed_port}" in recorded(engine, study_uid)["ris"][0]["reason"]


def test_a_refusing_ris_is_a_failed_publication_with_its_answer(tmp_path):
    listener = MllpListener(ack_code="AR")
    try:
        [publisher] = build_publishers([{"name": "ris", "kind": "hl7v2", "host": "127.0.0.1",
                                         "port": listener.port}])
        [outcome] = publisher.publish(PriorityUpdate(generate_uid(), "stat", "AI priority stat", ACCESSION))
    finally:
        listener.close()
    assert outcome.action == FAILED and "refused with AR" in outcome.reason


def test_a_publishing_error_never_fails_the_caller(tmp_path, engine, postgres_url):
    study_uid, run_id = processed_study(engine)
    settings = configure(tmp_path, postgres_url, [{"name": "bad", "kind": "carrier_pigeon"}])

    assert publish_result(settings, engine, run_id, result(study_uid, "stat")) == []

    with engine.connect() as c:
        [reason] = c.execute(select(events.c.reason).where(events.c.kind == "error")).scalars().all()
    assert "carrier_pigeon" in reason


# --- messages and configuration ----------------------------------------------------------------------------

def test_older_hl7_versions_carry_the_priority_in_orc_7_and_obr_27_without_tq1():
    publisher = Hl7OrderPublisher("ris", "127.0.0.1", 2575, PriorityScale(**Hl7OrderPublisher.default_scale),
                                  version="2.3.1")
    update = PriorityUpdate("1.2.3", "stat", "AI priority stat (a|b^c)", ACCESSION, "MRI BRAIN",
                            patient_id="P1")

    message = hl7.parse(publisher.build_message(update, "S", "raised because a|b^c"))

    assert str(message.segment("ORC")[7]) == "^^^^^S" and str(message.segment("OBR")[27]) == "^^^^^S"
    assert not any(str(s[0]) == "TQ1" for s in message)
    assert str(message.segment("PID")[3]) == "P1"
    assert message.unescape(str(message.segment("NTE")[3])) == "raised because a|b^c"


def test_priority_levels_are_configuration_and_checked():
    ranks = Hl7OrderPublisher.default_scale["ranks"]
    custom = PriorityScale({"routine": "R", "urgent": "S", "stat": "S"}, ranks)
    assert custom.value_for("urgent") == "S"
    with pytest.raises(PublisherConfigError, match="must not rank a higher AI level below a lower one"):
        PriorityScale({"routine": "HIGH", "urgent": "MEDIUM", "stat": "LOW"},
                      {"LOW": 0, "MEDIUM": 1, "HIGH": 2})
    with pytest.raises(PublisherConfigError, match="no rank"):
        PriorityScale({"routine": "LOW", "urgent": "MEDIUM", "stat": "URGENT!"}, {"LOW": 0, "MEDIUM": 1})


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "kind": "fax"}, "kind must be one of"),
    ({"name": "x", "kind": "ups_rs"}, r"needs \['url'\]"),
    ({"name": "x", "kind": "webhook", "url": "http://h", "colour": "red"}, r"unknown keys \['colour'\]"),
    ({"name": "x", "kind": "webhook", "url": "http://h", "min_priority": "high"},
     "min_priority must be one of"),
    ({"name": "x", "kind": "hl7v2", "host": "h", "port": 1, "message": "ADT^A08"}, "message must be one of"),
    ({"name": "x", "kind": "fhir", "url": "http://h", "token_env": "TRIAGE_TEST_NO_SUCH_TOKEN"}, "is empty"),
])
def test_a_malformed_publisher_entry_is_refused_naming_it(entry, message):
    with pytest.raises(PublisherConfigError, match=message):
        build_publishers([entry])


def test_the_pipeline_module_does_not_make_pacs_bridge_import_the_worker():
    import subprocess
    import sys

    code = ("import sys, pacs_bridge.publishers; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'models', 'worker', 'train')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stdout + run.stderr


# --- the pipeline hook, with a real (tiny, random) model ---------------------------------------------------

@pytest.mark.slow
def test_a_study_processed_by_the_pipeline_reaches_the_ups_worklist(tmp_path, tmp_path_factory, engine,
                                                                    postgres_url, ris):
    from models.bundle import random_bundle, save_bundle
    from train.phantoms import write_phantom_study
    from worker.pipelines.neuro_mri import NeuroMriPipeline
    from worker.run_book import RunBook

    phantom = write_phantom_study(tmp_path_factory.mktemp("phantom"), lesion="subdural_haemorrhage", seed=3)
    bundle_dir = tmp_path_factory.mktemp("bundle")
    bundle = random_bundle("tiny", seed=0)
    save_bundle(bundle_dir, bundle.vqvae, bundle.prima, bundle.manifest)
    accession = pydicom.dcmread(phantom.files[0], stop_before_pixels=True).AccessionNumber
    workitem = ris.add_workitem(phantom.study_instance_uid, accession, "LOW")
    settings = configure(tmp_path, postgres_url, [
        {"name": "down", "kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/hook",
         "min_priority": "routine", "timeout_s": 1},
        {"name": "ups", "kind": "ups_rs", "url": f"{ris.url}/dicom-web"}])
    settings.model.bundle, settings.model.device = str(bundle_dir), "cpu"
    # A random model has no opinion: the clinical map makes its output read as stat.
    settings.model.priority_map = dict.fromkeys(("none", "low", "medium", "high"), "stat")
    run_id = ingest(engine, phantom.files)

    outcome = NeuroMriPipeline(RunBook(settings, engine, enqueue_delivery=lambda _: None)).process(run_id)

    assert outcome.status == "done"
    wait_for(lambda: ris.priority(workitem) == "HIGH", 5, what="the workitem's priority")
    books = recorded(engine, phantom.study_instance_uid)
    assert books["ups"][0]["action"] == RAISED and books["down"][0]["action"] == FAILED
