"""The receiving service (``triage serve``): the SCP, its bookkeeper and the study assembler, wired together."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pacs_bridge.assembly import CompletionPolicy, StudyAssembler
from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.schema import make_engine
from pacs_bridge.scp import ScpSettings, StorageSCP
from pacs_bridge.storage import InstanceStore
from worker.celery_app import dispatcher, make_celery
from worker.config import Settings

log = logging.getLogger(__name__)


@dataclass
class ReceivingService:
    scp: StorageSCP
    bookkeeper: Bookkeeper
    assembler: StudyAssembler

    def start(self) -> None:
        self.bookkeeper.start()
        self.scp.start()
        self.assembler.start()

    def stop(self) -> None:
        self.scp.stop()
        self.assembler.stop()
        self.bookkeeper.stop()


def build_receiving_service(settings: Settings) -> ReceivingService:
    engine = make_engine(settings.database_url)
    scp_settings = settings["scp"]
    store = InstanceStore(settings.incoming_dir, settings.quarantine_dir)
    bookkeeper = Bookkeeper(engine)
    scp = StorageSCP(
        ScpSettings(
            ae_title=scp_settings["ae_title"], host=scp_settings["host"], port=int(scp_settings["port"]),
            allowed_calling_aets=list(scp_settings["allowed_calling_aets"] or []),
            max_pdu=int(scp_settings["max_pdu"]), max_associations=int(scp_settings["max_associations"]),
            network_timeout_s=float(scp_settings["network_timeout_s"]),
        ),
        store, bookkeeper,
    )
    assembly = settings["assembly"]
    assembler = StudyAssembler(
        engine,
        dispatch=dispatcher(make_celery(settings)),
        policy=CompletionPolicy(float(assembly["quiet_period_s"]), float(assembly["max_wait_s"])),
        active_studies=scp.active.current,
        poll_interval_s=float(assembly["poll_interval_s"]),
    )
    return ReceivingService(scp, bookkeeper, assembler)
