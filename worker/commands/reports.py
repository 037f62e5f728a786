"""``triage reports``: the HL7 MLLP final-report listener, relabelling stored reports, sending HL7 files.

The listener joins the DICOM edge's HL7 intake (``pacs_bridge.hl7_intake``) to the report labeller
(``models.labeller``), so every accepted ORU^R01 lands as a report with its ground-truth labels.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from sqlalchemy import delete, insert, select

from models.labeller import default_labeller
from pacs_bridge.hl7_intake import MllpReportListener, ReportIntake, ack_code, send_messages
from pacs_bridge.hl7_senders import MllpLimits, SenderAllowList, mllp_tls_context
from pacs_bridge.study_attributes import AttributePolicy
from sql.database import make_engine, upgrade
from sql.report_schema import ground_truth_labels, reports
from sql.schema import utcnow
from worker.config import Settings, load_settings

log = logging.getLogger(__name__)


def kept_dir(settings: Settings) -> Path:
    return Path(settings.fairness.hl7_kept_dir or settings.var_dir / "hl7")


def build_intake(settings: Settings, engine=None) -> ReportIntake:
    """The HL7 intake as configured, with the default report labeller."""
    fairness = settings.fairness
    return ReportIntake(engine or make_engine(settings.database_url), AttributePolicy.from_settings(fairness.model_dump()),
                        kept_dir(settings), labeller=default_labeller(),
                        application=fairness.mllp_application, facility=fairness.mllp_facility,
                        senders=SenderAllowList.from_config(fairness.mllp_senders))


def listener_limits(settings: Settings) -> MllpLimits:
    fairness = settings.fairness
    return MllpLimits(max_connections=int(fairness.mllp_max_connections),
                      idle_timeout_s=float(fairness.mllp_idle_timeout_s),
                      message_timeout_s=float(fairness.mllp_message_timeout_s))


def _listen(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    upgrade(settings.database_url)
    fairness = settings.fairness
    listener = MllpReportListener(build_intake(settings), host=args.host or fairness.mllp_host,
                                  port=int(args.port if args.port is not None else fairness.mllp_port),
                                  limits=listener_limits(settings),
                                  ssl_context=mllp_tls_context(fairness.mllp_tls.model_dump())).start()
    print(f"triage: HL7 MLLP report listener on {listener.host}:{listener.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    listener.stop()
    return 0


def _relabel(args: argparse.Namespace) -> int:
    """Label every stored report again with the current labeller (replacing that labeller's earlier labels)."""
    settings = load_settings(args.config)
    engine = make_engine(settings.database_url)
    labeller = default_labeller()
    count = 0
    with engine.begin() as connection:
        rows = connection.execute(select(reports.c.id, reports.c.text)).all()
        for report_id, text in rows:
            connection.execute(delete(ground_truth_labels).where(ground_truth_labels.c.report_id == report_id,
                                                                 ground_truth_labels.c.source == labeller.name))
            mentions = labeller.label(text)
            if mentions:
                connection.execute(insert(ground_truth_labels), [
                    {"report_id": report_id, "label": m.label, "value": m.value, "source": labeller.name,
                     "evidence": (m.evidence or "")[:1000], "created_at": utcnow()} for m in mentions])
            count += 1
    print(json.dumps({"relabelled_reports": count, "labeller": labeller.name}))
    return 0


def _send(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    fairness = settings.fairness
    messages = [Path(path).read_bytes() for path in args.files]
    acks = send_messages(args.host or fairness.mllp_host, int(args.port or fairness.mllp_port), messages)
    for path, ack in zip(args.files, acks):
        print(json.dumps({"file": path, "ack": ack_code(ack)}))
    return 0 if all(ack_code(a) == "AA" for a in acks) else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser("reports", help="final radiology reports: HL7 listener, relabelling")
    commands = parser.add_subparsers(dest="reports_command", required=True)
    p = commands.add_parser("listen", help="receive HL7 v2 ORU^R01 final reports over MLLP and label them")
    p.add_argument("--host", help="listen address (default: fairness.mllp_host)")
    p.add_argument("--port", type=int, help="listen port (default: fairness.mllp_port; 0 picks a free one)")
    p.set_defaults(func=_listen)
    p = commands.add_parser("relabel", help="label every stored report again with the current labeller")
    p.set_defaults(func=_relabel)
    p = commands.add_parser("send", help="send HL7 message files over MLLP and print each ACK code")
    p.add_argument("files", nargs="+")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=_send)
