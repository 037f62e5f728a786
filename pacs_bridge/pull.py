"""Retrieving studies that are already in a PACS: one on demand, or many for backfill and retraining.

Finding: C-FIND (Study Root, STUDY level) or QIDO-RS, by study date window and modality. Retrieving, one of:

* ``cmove``: C-MOVE to our own SCP's AE title. The PACS sends the images by C-STORE to ``triage serve``, so they
  arrive by the ordinary path (checks, store, quarantine, bookkeeping, completion, routing). The PACS must know our
  AE title, host and port as a C-MOVE destination.
* ``cget``: C-GET on our association; the PACS sends the images back on it and they are accepted here by
  :func:`pacs_bridge.ingest.ingest`, exactly as the SCP would accept them.
* ``wado``: WADO-RS (dicomweb-client); each instance is accepted by the same :func:`ingest`.

In every case the study is then completed and routed by the assembler of ``triage serve`` like any other.

Every pull is a job in the database (``pull_jobs``) with a row per study (``pull_items``): the studies are listed
first, then retrieved one after another with a pause between them (throttling, so the PACS keeps serving its
users), each study's state committed as it changes. A job stopped by Ctrl-C finishes the study in hand and stops;
one killed outright leaves that study "retrieving". Either way, running the same backfill again resumes the job
(studies that failed are tried again): finished studies are never retrieved again, and a study already held in
full (as many instances as the PACS reports) is skipped.
"""
from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from pacs_bridge import association
from pacs_bridge.dicom_tls import TlsFiles
from pacs_bridge.ingest import IngestOutcome
from pacs_bridge.intake import STATUS_SUCCESS
from pacs_bridge.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from sql.pull_schema import pull_items, pull_jobs
from sql.schema import events, instances, series, studies, utcnow

log = logging.getLogger(__name__)

VIAS = ("cmove", "cget", "wado")

# Query/retrieve statuses (PS3.4 C.4.2.1.5, C.4.3.1.4).
STATUS_PENDING = (0xFF00, 0xFF01)
STATUS_WARNING = 0xB000
STATUS_CANCELLED = 0xFE00
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801


class PullError(Exception):
    """A query or retrieval that failed; the message names the source, the study and what to check."""


@dataclass(frozen=True)
class DimseSource:
    name: str
    host: str
    port: int
    ae_title: str
    tls: TlsFiles | None = None


@dataclass(frozen=True)
class DicomwebSource:
    name: str
    url: str


Source = DimseSource | DicomwebSource


def configured_sources(entries: Iterable[dict[str, Any]]) -> dict[str, Source]:
    """The ``pull.sources`` of the configuration by name; a malformed entry raises naming it."""
    found: dict[str, Source] = {}
    for entry in entries:
        name, kind = entry.get("name"), entry.get("kind", "dicom")
        if not name:
            raise ValueError(f"pull source {entry!r} has no name")
        try:
            if kind == "dicom":
                found[name] = DimseSource(name, entry["host"], int(entry["port"]), entry["ae_title"],
                                          TlsFiles.from_config(entry.get("tls")))
            elif kind == "dicomweb":
                found[name] = DicomwebSource(name, str(entry["url"]).rstrip("/"))
            else:
                raise ValueError(f"kind must be dicom or dicomweb, not {kind!r}")
        except KeyError as exc:
            raise ValueError(f"pull source {name!r} lacks {exc.args[0]!r}") from exc
    return found


def source_for(sources: dict[str, Source], via: str, name: str | None) -> Source:
    """The named source, or the first that can do ``via`` (C-MOVE/C-GET need DIMSE, WADO-RS needs DICOMweb)."""
    wanted = DicomwebSource if via == "wado" else DimseSource
    if name:
        if name not in sources:
            raise PullError(f"no pull source named {name!r}; configured: {', '.join(sources) or 'none'}")
        if not isinstance(sources[name], wanted):
            raise PullError(f"pull source {name!r} cannot do {via}: it is a "
                            f"{'DICOMweb' if isinstance(sources[name], DicomwebSource) else 'DIMSE'} source")
        return sources[name]
    for source in sources.values():
        if isinstance(source, wanted):
            return source
    kind = "dicomweb (url)" if via == "wado" else "dicom (host, port, ae_title)"
    raise PullError(f"{via} needs a pull source of kind {kind} under pull.sources; none is configured")


@dataclass(frozen=True)
class FoundStudy:
    study_instance_uid: str
    study_date: str = ""
    modalities: str = ""
    #: NumberOfStudyRelatedInstances as the PACS reports it (None when it does not).
    expected_instances: int | None = None


@dataclass(frozen=True)
class Retrieved:
    instances: int
    failed: int = 0
    detail: str = ""


# -- the network ---------------------------------------------------------------------------------------------
#: Associations a C-MOVE or C-GET may use when its responses stop: each waits up to the (long) retrieve timeout, so
#: one resend; a study that still fails is tried again when the job is run again.
RETRIEVE_ATTEMPTS = 2
_HINT = "; does the PACS know our AE title?"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _found(ds: Dataset) -> FoundStudy | None:
    uid = _text(ds, "StudyInstanceUID")
    if not uid:
        return None
    count = _text(ds, "NumberOfStudyRelatedInstances")
    return FoundStudy(uid, _text(ds, "StudyDate"), _text(ds, "ModalitiesInStudy")[:64],
                      int(count) if count.isdigit() else None)


def find_studies_dimse(source: DimseSource, calling_aet: str, dates: str, modality: str | None,
                       timeout_s: float = 120.0) -> list[FoundStudy]:
    """C-FIND at STUDY level for a StudyDate range (``YYYYMMDD-YYYYMMDD``) and optionally one modality."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.StudyDate = dates
    query.ModalitiesInStudy = modality or ""
    query.NumberOfStudyRelatedInstances = ""
    responses = association.request(
        source, calling_aet, [StudyRootQueryRetrieveInformationModelFind],
        lambda assoc: assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind),
        what=f"C-FIND for {dates}", timeout_s=30.0, dimse_timeout_s=timeout_s, error=PullError, hint=_HINT)
    found = []
    for status, identifier in responses:
        code = status.Status
        if code in STATUS_PENDING and identifier is not None:
            study = _found(identifier)
            if study is not None:
                found.append(study)
        elif code != STATUS_SUCCESS and code not in STATUS_PENDING:
            raise PullError(f"{source.name}: C-FIND for {dates} failed with status 0x{code:04X}")
    return found


def find_studies_qido(source: DicomwebSource, dates: str, modality: str | None,
                      timeout_s: float = 120.0) -> list[FoundStudy]:
    """QIDO-RS ``/studies`` for a StudyDate range and optionally one modality (all pages)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=source.url, timeout=timeout_s)
    filters = {"StudyDate": dates}
    if modality:
        filters["ModalitiesInStudy"] = modality
    try:
        results = client.search_for_studies(search_filters=filters, get_remaining=True,
                                            fields=["NumberOfStudyRelatedInstances", "ModalitiesInStudy"])
    except Exception as exc:  # requests' errors, HTTP status errors
        raise PullError(f"{source.name}: QIDO-RS for {dates} at {source.url} failed: {exc}") from exc
    return [s for s in (_found(Dataset.from_json(r)) for r in results) if s is not None]


def move_study(source: DimseSource, calling_aet: str, destination_aet: str, study_uid: str,
               timeout_s: float = 600.0) -> Retrieved:
    """C-MOVE one study to ``destination_aet`` (our SCP); returns the PACS's count of completed sub-operations."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    responses = association.request(
        source, calling_aet, [StudyRootQueryRetrieveInformationModelMove],
        lambda assoc: assoc.send_c_move(query, destination_aet, StudyRootQueryRetrieveInformationModelMove),
        what=f"C-MOVE of {study_uid}", timeout_s=30.0, dimse_timeout_s=timeout_s, error=PullError, hint=_HINT,
        attempts=RETRIEVE_ATTEMPTS)
    final = responses[-1][0]
    return _sub_operations(source, "C-MOVE", study_uid, final, destination_aet)


def get_study(source: DimseSource, calling_aet: str, study_uid: str, receive: Callable[[bytes], IngestOutcome],
              timeout_s: float = 600.0) -> Retrieved:
    """C-GET one study; each instance the PACS sends back on the association is handed to ``receive``."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    contexts: list = [StudyRootQueryRetrieveInformationModelGet]
    contexts += [(uid, TRANSFER_SYNTAXES) for uid in STORAGE_SOP_CLASSES.values()]
    roles = [build_role(uid, scp_role=True) for uid in STORAGE_SOP_CLASSES.values()]

    def on_store(event: evt.Event) -> int:
        return receive(event.encoded_dataset(include_meta=True)).status

    responses = association.request(
        source, calling_aet, contexts,
        lambda assoc: assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet),
        what=f"C-GET of {study_uid}", timeout_s=30.0, dimse_timeout_s=timeout_s, error=PullError, hint=_HINT,
        attempts=RETRIEVE_ATTEMPTS, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    final = responses[-1][0]
    return _sub_operations(source, "C-GET", study_uid, final, None)


def _sub_operations(source: Source, what: str, study_uid: str, final: Dataset | None,
                    destination_aet: str | None) -> Retrieved:
    if final is None:
        raise PullError(f"{source.name}: {what} of {study_uid} ended without a final status")
    code = final.Status
    completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    warned = int(final.get("NumberOfWarningSuboperations", 0) or 0)
    if code == STATUS_MOVE_DESTINATION_UNKNOWN:
        raise PullError(f"{source.name}: the PACS does not know {destination_aet!r} as a C-MOVE destination; "
                        f"add our AE title, host and SCP port to its list of DICOM nodes")
    # Nothing arrived on a C-MOVE: most often the PACS could not reach our SCP.
    hint = (f"; is `triage serve` listening as {destination_aet!r}, at the host and port the PACS has for it?"
            if destination_aet and completed + warned == 0 else "")
    if code not in (STATUS_SUCCESS, STATUS_WARNING):
        raise PullError(f"{source.name}: {what} of {study_uid} failed with status 0x{code:04X} "
                        f"({completed} sent, {failed} failed){hint}")
    if completed + warned == 0 and failed:
        raise PullError(f"{source.name}: {what} of {study_uid}: all {failed} sub-operations failed{hint}")
    return Retrieved(completed + warned, failed, f"{completed + warned} sent, {failed} failed")


def wado_study(source: DicomwebSource, study_uid: str, receive: Callable[[bytes], IngestOutcome],
               timeout_s: float = 600.0) -> Retrieved:
    """WADO-RS one study, instance by instance as the response streams; each is handed to ``receive``."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=source.url, timeout=timeout_s)
    accepted = failed = 0
    try:
        for ds in client.iter_study(study_uid):
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            if receive(buffer.getvalue()).accepted:
                accepted += 1
            else:
                failed += 1
    except PullError:
        raise
    except Exception as exc:  # requests' errors, HTTP status errors, a broken multipart stream
        raise PullError(f"{source.name}: WADO-RS of {study_uid} from {source.url} failed after {accepted} "
                        f"instances: {exc}") from exc
    if accepted == 0 and failed == 0:
        raise PullError(f"{source.name}: WADO-RS of {study_uid} returned no instances")
    return Retrieved(accepted, failed, f"{accepted} stored, {failed} refused")


# -- the jobs ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSummary:
    job_id: int
    status: str
    counts: dict[str, int]

    def line(self) -> str:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(self.counts.items())) or "no studies"
        return f"pull job {self.job_id}: {self.status} ({counts})"


def date_windows(first: date, last: date, days: int) -> list[tuple[date, date]]:
    """Consecutive inclusive windows of at most ``days`` days covering ``first``..``last``."""
    if last < first:
        raise ValueError(f"the date range ends ({last}) before it starts ({first})")
    windows, start = [], first
    while start <= last:
        end = min(start + timedelta(days=max(days, 1) - 1), last)
        windows.append((start, end))
        start = end + timedelta(days=1)
    return windows


class Puller:
    """Runs pull jobs: lists a job's studies, then retrieves them one by one, recording every step."""

    def __init__(self, engine: Engine, sources: dict[str, Source], *, calling_aet: str, move_destination: str,
                 receive_factory: Callable[[Source, str], Callable[[bytes], IngestOutcome]] | None = None,
                 wait_recorded: Callable[[], bool] | None = None, pause_s: float = 2.0,
                 query_window_days: int = 7, timeout_s: float = 600.0, stop: threading.Event | None = None,
                 report: Callable[[str], None] = log.info) -> None:
        self.engine = engine
        self.sources = sources
        self.calling_aet = calling_aet
        self.move_destination = move_destination
        #: (source, via) -> a function accepting one instance's bytes (C-GET, WADO-RS); built by the caller,
        #: which owns the store and the bookkeeper.
        self.receive_factory = receive_factory
        #: Blocks until what was received is written to the database (the caller's bookkeeper).
        self.wait_recorded = wait_recorded or (lambda: True)
        self.pause_s = pause_s
        self.query_window_days = query_window_days
        self.timeout_s = timeout_s
        self.stop = stop or threading.Event()
        self.report = report

    # jobs
    def pull_job(self, study_uid: str, via: str, source_name: str | None = None) -> int:
        """A job for one study (retrieved even if held: asked for by name)."""
        source = source_for(self.sources, via, source_name)
        job_id = self._create_job("pull", via, source.name, {"study": study_uid})
        self._add_items(job_id, [FoundStudy(study_uid)])
        self._mark(job_id, queried_at=utcnow())
        return job_id

    def backfill_job(self, first: date, last: date, modalities: list[str], via: str,
                     source_name: str | None = None, resume: bool = True) -> tuple[int, bool]:
        """The unfinished job with the same parameters (resumed), or a new one; returns (job id, resumed)."""
        source = source_for(self.sources, via, source_name)
        query = {"from": first.isoformat(), "to": last.isoformat(), "modalities": sorted(set(modalities))}
        if resume:
            with self.engine.connect() as connection:
                for job in connection.execute(
                    select(pull_jobs).where(and_(pull_jobs.c.kind == "backfill", pull_jobs.c.via == via,
                                                 pull_jobs.c.source == source.name, pull_jobs.c.status != "done"))
                    .order_by(pull_jobs.c.id.desc())
                ):
                    if job.query == query:
                        return job.id, True
        return self._create_job("backfill", via, source.name, query), False

    def run(self, job_id: int) -> JobSummary:
        """List the job's studies if not done yet, then retrieve each pending one, pausing between them."""
        with self.engine.connect() as connection:
            job = connection.execute(select(pull_jobs).where(pull_jobs.c.id == job_id)).one()
        source = self.sources.get(job.source)
        if source is None:
            raise PullError(f"job {job_id}: its source {job.source!r} is no longer configured")
        self._mark(job_id, status="running", finished_at=None)
        if job.queried_at is None:
            self._query(job_id, job.query, job.via, source)
        with self.engine.begin() as connection:
            # A study left 'retrieving' by a killed process is retried, and so is one that failed last time (the
            # PACS was down, say): what arrived of it is held already and is not recorded twice (the bookkeeping
            # keys instances by SOP Instance UID and content). Finished studies are never retrieved again.
            connection.execute(update(pull_items).where(and_(pull_items.c.job_id == job_id,
                                                             pull_items.c.status.in_(("retrieving", "failed"))))
                               .values(status="pending"))
            items = connection.execute(select(pull_items).where(and_(pull_items.c.job_id == job_id,
                                                                     pull_items.c.status == "pending"))
                                       .order_by(pull_items.c.study_date, pull_items.c.id)).all()
        total = len(items)
        for number, item in enumerate(items, 1):
            if self.stop.is_set():
                break
            if job.kind == "backfill" and self._already_held(item):
                self._finish_item(item, "skipped", None, None, source)
                self.report(f"[{number}/{total}] {item.study_instance_uid}: already held, skipped")
                continue
            self._retrieve(item, job.via, source, f"[{number}/{total}]")
            if number < total and self.stop.wait(self.pause_s):
                break
        summary = self.summary(job_id)
        status = "interrupted" if summary.counts.get("pending") else (
            "failed" if summary.counts.get("failed") else "done")
        self._mark(job_id, status=status, finished_at=utcnow() if status != "interrupted" else None)
        return JobSummary(job_id, status, summary.counts)

    def summary(self, job_id: int) -> JobSummary:
        with self.engine.connect() as connection:
            status = connection.execute(select(pull_jobs.c.status).where(pull_jobs.c.id == job_id)).scalar_one()
            counts = dict(connection.execute(
                select(pull_items.c.status, func.count()).where(pull_items.c.job_id == job_id)
                .group_by(pull_items.c.status)).all())
        return JobSummary(job_id, status, counts)

    # steps
    def _query(self, job_id: int, query: dict, via: str, source: Source) -> None:
        first, last = date.fromisoformat(query["from"]), date.fromisoformat(query["to"])
        modalities = query.get("modalities") or [None]
        found = 0
        for start, end in date_windows(first, last, self.query_window_days):
            dates = f"{start:%Y%m%d}-{end:%Y%m%d}"
            for modality in modalities:
                if isinstance(source, DicomwebSource):
                    studies_found = find_studies_qido(source, dates, modality)
                else:
                    studies_found = find_studies_dimse(source, self.calling_aet, dates, modality)
                found += self._add_items(job_id, studies_found)
        self._mark(job_id, queried_at=utcnow())
        self.report(f"pull job {job_id}: {found} studies found from {first} to {last}"
                    + (f" ({', '.join(m for m in modalities if m)})" if modalities != [None] else ""))

    def _retrieve(self, item, via: str, source: Source, position: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(pull_items).where(pull_items.c.id == item.id).values(
                status="retrieving", attempts=item.attempts + 1, started_at=utcnow(), error=None))
        started = time.monotonic()
        try:
            if via == "cmove":
                retrieved = move_study(source, self.calling_aet, self.move_destination, item.study_instance_uid,
                                       self.timeout_s)
                self._await_recorded(item.study_instance_uid, retrieved.instances)
            elif via == "cget":
                retrieved = get_study(source, self.calling_aet, item.study_instance_uid,
                                      self._receiver(source, "c-get"), self.timeout_s)
            else:
                retrieved = wado_study(source, item.study_instance_uid, self._receiver(source, "wado-rs"),
                                       self.timeout_s)
            # Done means recorded: a study marked done but lost from the bookkeeping would never be fetched again.
            if via != "cmove" and not self.wait_recorded():
                raise PullError("the received instances could not be written to the database")
        except (PullError, OSError) as exc:
            self._finish_item(item, "failed", None, str(exc), source)
            self.report(f"{position} {item.study_instance_uid}: failed: {exc}")
            return
        status = "failed" if retrieved.failed and not retrieved.instances else "done"
        error = f"{retrieved.failed} instance(s) not retrieved" if retrieved.failed else None
        self._finish_item(item, status, retrieved.instances, error, source)
        self.report(f"{position} {item.study_instance_uid} ({item.study_date or 'no date'}): {retrieved.detail} "
                    f"by {via} in {time.monotonic() - started:.1f}s")

    def _receiver(self, source: Source, how: str) -> Callable[[bytes], IngestOutcome]:
        if self.receive_factory is None:
            raise PullError(f"{how} stores what it retrieves itself, and no store was given to the puller")
        return self.receive_factory(source, how)

    def _await_recorded(self, study_uid: str, count: int, timeout_s: float = 60.0) -> None:
        """Wait until our SCP's bookkeeping holds ``count`` instances of the study (C-MOVE arrives elsewhere)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.engine.connect() as connection:
                held = connection.execute(
                    select(func.count()).select_from(instances.join(series, series.c.id == instances.c.series_id)
                                                     .join(studies, studies.c.id == series.c.study_id))
                    .where(studies.c.study_instance_uid == study_uid)).scalar_one()
            if held >= count:
                return
            if time.monotonic() > deadline:
                raise PullError(f"the PACS reported {count} instances of {study_uid} sent, but only {held} are "
                                f"recorded after {timeout_s:g}s: is `triage serve` receiving with this database?")
            time.sleep(0.2)

    def _already_held(self, item) -> bool:
        with self.engine.connect() as connection:
            held = connection.execute(select(studies.c.instance_count).where(
                studies.c.study_instance_uid == item.study_instance_uid)).scalar()
            if held is None:
                return False
            if item.expected_instances is not None:
                return held >= item.expected_instances
            # The PACS gave no count: held in full if an earlier job retrieved it.
            return connection.execute(select(pull_items.c.id).where(and_(
                pull_items.c.study_instance_uid == item.study_instance_uid, pull_items.c.status == "done",
                pull_items.c.id != item.id))).first() is not None

    # records
    def _create_job(self, kind: str, via: str, source: str, query: dict) -> int:
        if via not in VIAS:
            raise PullError(f"--via must be one of {', '.join(VIAS)}, not {via!r}")
        now = utcnow()
        with self.engine.begin() as connection:
            return connection.execute(insert(pull_jobs).values(
                kind=kind, via=via, source=source, query=query, status="running", created_at=now,
                updated_at=now)).inserted_primary_key[0]

    def _add_items(self, job_id: int, found: list[FoundStudy]) -> int:
        added = 0
        with self.engine.begin() as connection:
            for study in found:
                try:
                    with connection.begin_nested():
                        connection.execute(insert(pull_items).values(
                            job_id=job_id, study_instance_uid=study.study_instance_uid,
                            study_date=study.study_date[:8] or None, modalities=study.modalities or None,
                            expected_instances=study.expected_instances, status="pending", attempts=0))
                    added += 1
                except IntegrityError:  # listed already (an earlier window, another modality, a resumed query)
                    continue
        return added

    def _finish_item(self, item, status: str, received: int | None, error: str | None, source: Source) -> None:
        now = utcnow()
        with self.engine.begin() as connection:
            connection.execute(update(pull_items).where(pull_items.c.id == item.id).values(
                status=status, instances_received=received, error=error, finished_at=now))
            connection.execute(update(pull_jobs).where(pull_jobs.c.id == item.job_id).values(updated_at=now))
            connection.execute(insert(events).values(
                at=now, kind="pull", study_instance_uid=item.study_instance_uid,
                reason=f"pull job {item.job_id} from {source.name}: {status}"
                       + (f", {received} instance(s)" if received is not None else "") + (f": {error}" if error else ""),
                detail={"job_id": item.job_id, "item_id": item.id, "status": status}))

    def _mark(self, job_id: int, **values) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(pull_jobs).where(pull_jobs.c.id == job_id)
                               .values(updated_at=utcnow(), **values))
