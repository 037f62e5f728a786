"""Reliable delivery of results: one ``deliveries`` row per (run, destination), attempts with backoff, then a
dead-letter state that an operator lists and retries (``triage deliveries``).

A delivery is retried by Celery (the ``triage.deliver`` task re-queues itself with a countdown: exponential
backoff capped at ``delivery.max_backoff_s``) for ``delivery.retry_for_s`` after it was created, long enough for a
PACS maintenance window, and is then marked ``failed``: the dead-letter list. Nothing is lost: the SR stays in the
outbox and the row keeps the last error. Each attempt is one association or one STOW-RS request; a destination
that refuses is never hammered (backoff, bounded attempts).

The same rows and task carry forwards: a routing rule that sends the study's images, as received, to a destination
(kind ``images``, a list of files; :mod:`pacs_bridge.forwarding`), on routing or after processing when the result
satisfies the rule's condition. Destinations marked ``results: false`` get forwards and no SRs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Engine

from pacs_bridge.dicom_send import DeliveryError, DicomDestination
from pacs_bridge.dicom_tls import TlsFiles
from pacs_bridge.dicomweb_send import DicomwebDestination
from pacs_bridge.forwarding import create_forwards
from pacs_bridge.rules import RuleError, forward_from_plan, result_facts
from pacs_bridge.sender import Destination, send_files
from sql.schema import deliveries, events, processing_runs, studies, utcnow
from worker.config import Settings
from worker.metrics import DEAD_LETTERS, DELIVERIES

log = logging.getLogger(__name__)

def configured_destinations(settings: Settings) -> dict[str, Destination]:
    """The destinations of the configuration by name; a malformed entry raises naming it."""
    found: dict[str, Destination] = {}
    for entry in settings.destinations:
        name, kind = entry.get("name"), entry.get("kind", "dicom")
        if not name:
            raise ValueError(f"destination {entry!r} has no name")
        if kind == "dicom":
            found[name] = DicomDestination(name, entry["host"], int(entry["port"]), entry["ae_title"],
                                           tls=TlsFiles.from_config(entry.get("tls")))
        elif kind == "dicomweb":
            found[name] = DicomwebDestination(name, entry["url"].rstrip("/"))
        else:
            raise ValueError(f"destination {name!r}: kind must be dicom or dicomweb, not {kind!r}")
    return found


@dataclass(frozen=True)
class RetryPolicy:
    """When the next attempt of a failed delivery (or publication) is due, or that there is none."""

    backoff_s: float
    max_backoff_s: float
    retry_for_s: float
    #: 0: no limit on the number of attempts, only on the time.
    max_attempts: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "RetryPolicy":
        cfg = settings.delivery
        policy = cls(float(cfg.backoff_s), float(cfg.max_backoff_s), float(cfg.retry_for_s),
                     int(cfg.attempts or 0))
        for key in ("backoff_s", "max_backoff_s", "retry_for_s"):
            if getattr(policy, key) < 0:
                raise ValueError(f"delivery.{key} must not be negative, not {getattr(policy, key)}")
        return policy

    def next_delay(self, attempts_made: int, elapsed_s: float) -> float | None:
        """Seconds until the next attempt after ``attempts_made`` failed ones, the first ``elapsed_s`` seconds
        ago; None when it is time to give up. The last attempt is moved to the deadline rather than dropped."""
        if self.max_attempts and attempts_made >= self.max_attempts:
            return None
        remaining = self.retry_for_s - elapsed_s
        if remaining <= 0:
            return None
        delay = min(self.backoff_s * 2 ** max(attempts_made - 1, 0), self.max_backoff_s)
        return max(min(delay, remaining), 0.0)


@dataclass(frozen=True)
class AttemptOutcome:
    delivered: bool
    error: str | None = None
    unknown_destination: bool = False


class DeliveryBook:
    """The ``deliveries`` table: creating deliveries, attempting one, dead-lettering, listing and retrying."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy.from_settings(self.settings)

    def next_attempt_in(self, delivery_id: int) -> float | None:
        """Seconds until the failed delivery's next attempt under the retry policy, None to dead-letter it. The
        due time is kept in ``queued_at``, so the sweeper re-sends a retry only once it is overdue (a lost
        message), never one that is merely waiting for its countdown."""
        with self.engine.connect() as connection:
            row = connection.execute(select(deliveries.c.attempts, deliveries.c.created_at)
                                     .where(deliveries.c.id == delivery_id)).first()
        if row is None:
            return None
        now = utcnow()
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=now.tzinfo)
        delay = self.policy.next_delay(row.attempts, (now - created).total_seconds())
        if delay is not None:
            with self.engine.begin() as connection:
                connection.execute(update(deliveries).where(deliveries.c.id == delivery_id)
                                   .values(queued_at=now + timedelta(seconds=delay)))
        return delay

    def create(self, run_id: int, sop_instance_uid: str, path: Path) -> list[int]:
        """One pending delivery per destination that takes results (existing ones are kept: idempotent per run)."""
        ids = []
        with self.engine.begin() as connection:
            for name in result_destinations(self.settings):
                row = connection.execute(select(deliveries.c.id).where(and_(
                    deliveries.c.run_id == run_id, deliveries.c.destination == name))).first()
                if row is None:
                    row_id = connection.execute(insert(deliveries).values(
                        run_id=run_id, destination=name, sop_instance_uid=sop_instance_uid, path=str(path),
                        status="pending", attempts=0, created_at=utcnow())).inserted_primary_key[0]
                else:
                    row_id = row.id
                ids.append(row_id)
        return ids

    def create_forwards_after(self, run_id: int, result, probabilities=None) -> list[int]:
        """The forwards of the run's routing rule that the result satisfies: one pending ``images`` delivery per
        destination. Each decision, forwarded or not, is recorded as an event with its reason. Returns the ids of
        the run's undelivered forwards (a re-done run gets the same rows back, none twice)."""
        now = utcnow()
        facts = result_facts(result, probabilities)
        with self.engine.begin() as connection:
            run = connection.execute(
                select(processing_runs.c.study_id, processing_runs.c.study_version, processing_runs.c.routing,
                       studies.c.study_instance_uid)
                .select_from(processing_runs.join(studies, studies.c.id == processing_runs.c.study_id))
                .where(processing_runs.c.id == run_id)).one()
            plans = (run.routing or {}).get("forward_after") or []
            rule = (run.routing or {}).get("rule")
            for plan in plans:
                try:
                    forward = forward_from_plan(plan)
                except RuleError as exc:
                    connection.execute(insert(events).values(
                        at=now, kind="forward", study_instance_uid=run.study_instance_uid,
                        reason=f"forward of rule {rule!r} not evaluated: {exc}", detail={"run_id": run_id}))
                    continue
                verdict = forward.condition.evaluate(facts) if forward.condition else None
                if verdict is not None and not verdict.holds:
                    connection.execute(insert(events).values(
                        at=now, kind="forward", study_instance_uid=run.study_instance_uid,
                        reason=f"not forwarded to {', '.join(forward.destinations)} after processing (rule "
                               f"{rule!r}): {verdict.why}",
                        detail={"run_id": run_id, "destinations": list(forward.destinations), "forwarded": False}))
                    continue
                why = f"rule {rule!r} after processing: " + (verdict.why if verdict else "unconditional")
                create_forwards(connection, study_id=run.study_id, study_version=run.study_version,
                                study_uid=run.study_instance_uid,
                                study_folder=self.settings.incoming_dir / run.study_instance_uid,
                                forward=forward, why=why, now=now, run_id=run_id)
            ids = connection.execute(select(deliveries.c.id).where(and_(
                deliveries.c.study_id == run.study_id, deliveries.c.study_version == run.study_version,
                deliveries.c.kind == "images", deliveries.c.stage == "after",
                deliveries.c.status != "delivered")).order_by(deliveries.c.id)).scalars().all()
            if ids:
                connection.execute(update(deliveries).where(deliveries.c.id.in_(ids)).values(queued_at=now))
        return list(ids)

    def attempt(self, delivery_id: int) -> AttemptOutcome:
        """One try. Delivered rows are left alone (a redelivered task does not send twice)."""
        with self.engine.connect() as connection:
            row = connection.execute(select(deliveries).where(deliveries.c.id == delivery_id)).first()
        if row is None or row.status == "delivered":
            return AttemptOutcome(True)
        destination = configured_destinations(self.settings).get(row.destination)
        if destination is None:
            error = f"destination {row.destination!r} is no longer configured"
            self._record(row, "failed", error)
            return AttemptOutcome(False, error, unknown_destination=True)
        started = time.monotonic()
        try:
            # A forward sends the study's images as received; an SR delivery, the SR's file.
            paths = [Path(p) for p in row.files or []] if row.kind == "images" else [Path(row.path)]
            send_files(destination, paths, self.settings.delivery.ae_title)
        except (DeliveryError, OSError) as exc:
            DELIVERIES.labels(outcome="failed").inc()
            self._record(row, "pending", str(exc))
            return AttemptOutcome(False, str(exc))
        DELIVERIES.labels(outcome="delivered").inc()
        seconds = time.monotonic() - started
        with self.engine.connect() as connection:  # an SR's row names its run, not its study
            study_uid = _study_uid(connection, row) or connection.execute(
                select(studies.c.study_instance_uid).join(processing_runs, processing_runs.c.study_id == studies.c.id)
                .where(processing_runs.c.id == row.run_id)).scalar()
        log.info("study %s: %s %s delivered to %s on attempt %d in %.2fs (delivery %d, run %s)", study_uid,
                 row.kind, row.sop_instance_uid or "images", row.destination, row.attempts + 1, seconds, row.id,
                 row.run_id)
        self._record(row, "delivered", None)
        return AttemptOutcome(True)

    def dead_letter(self, delivery_id: int) -> None:
        DEAD_LETTERS.inc()
        with self.engine.begin() as connection:
            row = connection.execute(select(deliveries).where(deliveries.c.id == delivery_id)).first()
            connection.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(status="failed"))
            connection.execute(insert(events).values(
                at=utcnow(), kind="dead_letter", sop_instance_uid=row.sop_instance_uid,
                study_instance_uid=_study_uid(connection, row),
                reason=f"delivery {delivery_id} to {row.destination} failed {row.attempts} times: {row.last_error}",
                detail={"delivery_id": delivery_id, "destination": row.destination}))

    def _record(self, row, status: str, error: str | None) -> None:
        now = utcnow()
        values = {"attempts": row.attempts + 1, "last_error": error, "status": status}
        if status == "delivered":
            values["delivered_at"] = now
        with self.engine.begin() as connection:
            connection.execute(update(deliveries).where(deliveries.c.id == row.id).values(**values))
            connection.execute(insert(events).values(
                at=now, kind="delivery", sop_instance_uid=row.sop_instance_uid,
                study_instance_uid=_study_uid(connection, row),
                reason=f"{row.destination}: attempt {row.attempts + 1} " + ("delivered" if error is None else
                                                                            f"failed: {error}"),
                detail={"delivery_id": row.id, "run_id": row.run_id, "kind": row.kind}))
            # The run's turnaround ends with its SR acknowledged; forwarded images are not part of it.
            if status == "delivered" and row.kind == "sr":
                remaining = connection.execute(select(deliveries.c.id).where(and_(
                    deliveries.c.run_id == row.run_id, deliveries.c.status != "delivered"))).first()
                if remaining is None:
                    connection.execute(update(processing_runs).where(and_(
                        processing_runs.c.id == row.run_id, processing_runs.c.delivered_at.is_(None)))
                        .values(delivered_at=now))

    def undelivered(self) -> list:
        with self.engine.connect() as connection:
            return connection.execute(select(deliveries).where(deliveries.c.status != "delivered")
                                      .order_by(deliveries.c.id)).all()

    def retry_dead(self, delivery_ids: list[int] | None = None) -> dict[int, AttemptOutcome]:
        """Attempt each dead-lettered delivery (or the given ones) once more, now; returns the outcomes."""
        with self.engine.connect() as connection:
            query = select(deliveries.c.id).where(deliveries.c.status == "failed")
            if delivery_ids:
                query = query.where(deliveries.c.id.in_(delivery_ids))
            ids = connection.execute(query.order_by(deliveries.c.id)).scalars().all()
        outcomes = {}
        for delivery_id in ids:
            with self.engine.begin() as connection:
                connection.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(status="pending"))
            outcome = self.attempt(delivery_id)
            if not outcome.delivered:
                self.dead_letter(delivery_id)
            outcomes[delivery_id] = outcome
        return outcomes


def result_destinations(settings: Settings) -> list[str]:
    """The destinations that get SRs (all but those marked ``results: false``, which only receive forwards)."""
    return [entry["name"] for entry in settings.destinations if entry.get("results", True)]


def _study_uid(connection, row) -> str | None:
    if row.study_id is None:
        return None
    return connection.execute(select(studies.c.study_instance_uid).where(studies.c.id == row.study_id)).scalar()
