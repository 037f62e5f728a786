"""The receiving service (``triage serve``): the SCP, its bookkeeper and the study assembler, wired together."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import REGISTRY

from pacs_bridge.assembly import CompletionPolicy, StudyAssembler
from pacs_bridge.bookkeeping import Bookkeeper
from pacs_bridge.dcmtk_front import DcmtkFront
from pacs_bridge.periodic import PeriodicLoop
from pacs_bridge.reconcile import StoreReconciler
from pacs_bridge.rules import RuleSet
from pacs_bridge.scp import ScpSettings, StorageSCP
from pacs_bridge.storage import InstanceStore
from sql.database import make_engine
from worker.celery_app import DELIVER, DELIVERY_QUEUE, dispatcher, make_celery
from worker.config import Settings
from worker.metrics import HealthServer
from worker.queue_watch import QueueWatch, redis_depths
from worker.sweeper import Sweeper

log = logging.getLogger(__name__)


class ReceiverCollector:
    """Exposes the SCP's and bookkeeper's own counts at scrape time (pacs_bridge does not know Prometheus)."""

    def __init__(self, service: "ReceivingService") -> None:
        self.service = service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        received = CounterMetricFamily("triage_images_received", "Instances accepted by the SCP")
        received.add_metric([], self.service.scp.received)
        yield received
        deferred = CounterMetricFamily("triage_images_deferred",
                                       "C-STOREs answered Out of Resources, or associations refused, by back-pressure")
        deferred.add_metric([], self.service.scp.deferred)
        yield deferred
        rejected = CounterMetricFamily("triage_images_rejected", "Instances refused and quarantined", labels=["status"])
        for status, count in sorted(self.service.scp.rejected_by_status.items()):
            rejected.add_metric([f"0x{status:04X}"], count)
        yield rejected
        backlog = GaugeMetricFamily("triage_bookkeeping_backlog", "Received instances not yet in the database")
        backlog.add_metric([], self.service.bookkeeper.backlog)
        yield backlog
        yield from queue_depths(self.service.settings)
        if self.service.queue_watch is not None:
            yield from self.service.queue_watch.collect()


def queue_depths(settings: Settings):
    """Depth of each pipeline, delivery and job queue, every priority sub-queue counted, read from Redis (the
    embedded broker has no cheap count)."""
    from prometheus_client.core import GaugeMetricFamily

    if not settings.broker_url.startswith("redis"):
        return
    import redis


    family = GaugeMetricFamily("triage_queue_depth", "Messages waiting in a broker queue", labels=["queue"])
    try:
        for queue, depth in redis_depths(settings.broker_url).items():
            family.add_metric([queue], depth)
    except redis.RedisError:
        return
    yield family


@dataclass
class ReceivingService:
    settings: Settings
    scp: StorageSCP | DcmtkFront
    bookkeeper: Bookkeeper
    assembler: StudyAssembler
    sweeper: Sweeper | None = None
    reconciler: StoreReconciler | None = None
    reconcile_interval_s: float = 300.0
    queue_watch: QueueWatch | None = None
    health: HealthServer | None = None
    _collector: ReceiverCollector | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _startup: threading.Thread | None = None
    _reconcile_loop: PeriodicLoop | None = None

    def start(self) -> None:
        self.bookkeeper.start()
        self.scp.start()
        # Receiving starts at once; completing studies waits for the first reconciliation, or a study whose last
        # rows a crash lost would be completed without them and re-opened as a second version when they land.
        self._startup = threading.Thread(target=self._reconcile_then_assemble, name="startup", daemon=True)
        self._startup.start()
        if self.queue_watch is not None:
            self.queue_watch.start()
        port = int(self.settings.metrics.serve_port)
        if port:
            try:
                self.health = HealthServer(self.settings.metrics.host, port,
                                           checks=readiness_checks(self)).start()
                self._collector = ReceiverCollector(self)
                REGISTRY.register(self._collector)
            except OSError as exc:  # metrics are an aid, never a reason not to receive images
                log.warning("metrics endpoint on port %d not started: %s", port, exc)

    def _reconcile_then_assemble(self) -> None:
        if self.reconciler is not None:
            backoff = 1.0
            while not self._stopping.is_set():
                try:
                    report = self.reconciler.run(full=True)
                    log.info("start-up reconciliation: %s", report.as_dict())
                    break
                except Exception as exc:  # the database is not there yet: receive meanwhile, try again
                    log.warning("start-up reconciliation failed, retrying in %.0fs: %s", backoff, exc)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
            if self._stopping.is_set():
                return
            self._reconcile_loop = PeriodicLoop("reconcile", self.reconcile_interval_s, self.reconciler.run)
            self._reconcile_loop.start()
        self.assembler.start()
        if self.sweeper is not None:
            self.sweeper.start()

    @property
    def assembling(self) -> bool:
        """True once the start-up reconciliation is done and studies are being completed."""
        return self._startup is not None and not self._startup.is_alive() and not self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()
        if self.health is not None:
            self.health.stop()
            REGISTRY.unregister(self._collector)
        self.scp.stop()
        if self._startup is not None:
            self._startup.join(30)
        if self._reconcile_loop is not None:
            self._reconcile_loop.stop()
        self.assembler.stop()
        if self.sweeper is not None:
            self.sweeper.stop()
        if self.queue_watch is not None:
            self.queue_watch.stop()
        self.bookkeeper.stop()


def readiness_checks(service: "ReceivingService") -> dict:
    """Ready = the database takes writes (the bookkeeper's last batch went through) and the SCP listens."""
    return {
        "database": lambda: service.bookkeeper.last_error is None,
        "scp": lambda: service.scp.port > 0,
    }


def routing_rules(settings: Settings) -> RuleSet:
    """The configured routing rules, checked against the configured destinations (raises naming the problem)."""
    return RuleSet.from_config(settings.routing.model_dump(), destinations=[d.get("name") for d in settings.destinations])


def make_receiver(settings: ScpSettings, store: InstanceStore, bookkeeper: Bookkeeper,
                  spool_dir: Path) -> StorageSCP | DcmtkFront:
    """The C-STORE receiver of the configured engine (scp.engine)."""
    if settings.engine == "pynetdicom":
        return StorageSCP(settings, store, bookkeeper)
    if settings.engine == "dcmtk":
        return DcmtkFront(settings, store, bookkeeper, spool_dir)
    raise ValueError(f"scp.engine {settings.engine!r} is not one of pynetdicom, dcmtk")


def build_receiving_service(settings: Settings) -> ReceivingService:
    engine = make_engine(settings.database_url)
    store_settings = settings.store
    store = InstanceStore(settings.incoming_dir, settings.quarantine_dir, fsync=bool(store_settings.fsync))
    bookkeeper = Bookkeeper(engine, quarantine_file=store.quarantine_file)
    scp = make_receiver(settings.scp, store, bookkeeper, spool_dir=settings.var_dir / "spool")
    reconciler = StoreReconciler(engine, store, bookkeeper, grace_s=float(store_settings.reconcile_grace_s))
    assembly = settings.assembly
    celery_app = make_celery(settings)
    dispatch_run = dispatcher(celery_app)
    sweeper = Sweeper(
        engine, dispatch_run,
        lambda delivery_id: celery_app.send_task(DELIVER, args=[delivery_id], queue=DELIVERY_QUEUE),
        redispatch_after_s=float(settings.worker.redispatch_after_s),
        stale_running_s=float(settings.worker.task_time_limit_s),
        interval_s=max(float(assembly.poll_interval_s), 1.0),
    )
    assembler = StudyAssembler(
        engine,
        dispatch=dispatch_run,
        policy=CompletionPolicy(float(assembly.quiet_period_s), float(assembly.max_wait_s),
                                float(assembly.expected_series_settle_s)),
        active_studies=lambda: scp.active.current() | reconciler.active.current(),
        poll_interval_s=float(assembly.poll_interval_s),
        rules=routing_rules(settings),
        forward=lambda delivery_id: celery_app.send_task(DELIVER, args=[delivery_id], queue=DELIVERY_QUEUE),
        store_root=settings.incoming_dir,
    )
    # Only Redis answers the workers' broadcast cheaply; the embedded broker serves one host's demo.
    watch = QueueWatch(celery_app, settings, engine, float(settings.broker.consumer_check_interval_s)) \
        if settings.broker_url.startswith("redis") else None
    return ReceivingService(settings, scp, bookkeeper, assembler, sweeper, reconciler=reconciler,
                            reconcile_interval_s=float(store_settings.reconcile_interval_s), queue_watch=watch)
