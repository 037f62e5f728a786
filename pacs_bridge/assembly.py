"""Study completion: deciding when a study has arrived, and handing it on as exactly one processing run.

DICOM has no "study complete" signal over C-STORE, so, as mercure and the MONAI Informatics Gateway do, we use a
quiet period: a study is complete when no instance of it has arrived for its quiet period **and** no open
association is still sending it. The routing rule that matches the study so far may set its own quiet period and
maximum wait, and may name the series it expects (by SeriesDescription pattern): once every expected series is
present, no association is sending and nothing has arrived for a short settle time, the study is complete without
waiting out the quiet period. ``max_wait_s`` after its first instance a decision is forced, so a scanner that never
releases its association cannot hold a study back for ever.

A complete study is routed (:func:`pacs_bridge.routing.route`): loop prevention, then the configured rules. It gets
a completion event and a routing event naming the rule that matched and why, one ``processing_runs`` row per study
version (a unique constraint makes a second one impossible) carrying the lane and the forwards to decide after
processing, one task on the pipeline's queue, and one delivery per destination the rule forwards to on routing. A
study re-sent unchanged creates no new version; one that receives new images after dispatch is re-opened as the
next version by the bookkeeper.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from pacs_bridge.forwarding import create_forwards
from pacs_bridge.periodic import PeriodicLoop
from pacs_bridge.routing import DEFAULT_RULES, RoutingDecision, expected_series_present, route
from pacs_bridge.rules import RuleSet
from pacs_bridge.study_facts import HeaderCache, study_facts_from_database
from sql.schema import as_utc, deliveries, events, processing_runs, studies, utcnow

log = logging.getLogger(__name__)

#: Called with (run_id, pipeline, lane) once the run is committed; raises if the broker is unreachable. A callable
#: taking only (run_id, pipeline) is accepted too (every run then goes to its pipeline's queue in one lane).
Dispatch = Callable[..., None]
#: Called with a delivery id to hand a forward to the delivery queue; raises if the broker is unreachable.
Forwarder = Callable[[int], None]


@dataclass(frozen=True)
class CompletionPolicy:
    """The defaults; a routing rule may set its own quiet period and maximum wait."""

    quiet_period_s: float = 10.0
    max_wait_s: float = 900.0
    #: With all expected series present, how long nothing must have arrived (so the last series is not cut).
    expected_series_settle_s: float = 2.0


def _takes_lane(dispatch: Dispatch) -> bool:
    try:
        parameters = inspect.signature(dispatch).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


class StudyAssembler:
    """Polls the bookkeeping database for complete studies, routes and dispatches them."""

    def __init__(
        self,
        engine: Engine,
        dispatch: Dispatch,
        policy: CompletionPolicy,
        active_studies: Callable[[], set[str]] = set,
        poll_interval_s: float = 1.0,
        rules: RuleSet = DEFAULT_RULES,
        forward: Forwarder | None = None,
        store_root: Path | None = None,
    ) -> None:
        self.engine = engine
        self.dispatch = dispatch
        self._dispatch_takes_lane = _takes_lane(dispatch)
        self.policy = policy
        self.active_studies = active_studies
        self.poll_interval_s = poll_interval_s
        self.rules = rules
        self.forward = forward
        #: The store's incoming/ folder: a forward names the study's folder beside its list of files.
        self.store_root = store_root
        self.headers = HeaderCache(rules.tag_names())
        self._loop = PeriodicLoop("completion check", poll_interval_s, self.check_once)

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._loop.stop(timeout)

    def check_once(self, now: datetime | None = None) -> list[int]:
        """Complete what is due and (re)dispatch runs and forwards not yet handed to the broker; returns the run
        ids dispatched."""
        now = now or utcnow()
        active = self.active_studies()
        with self.engine.connect() as connection:
            candidates = connection.execute(
                select(studies.c.id, studies.c.study_instance_uid, studies.c.first_received_at,
                       studies.c.last_received_at).where(studies.c.status == "receiving")
            ).all()
        for row in candidates:
            try:
                why = self._due(row, now, row.study_instance_uid in active)
            except Exception:  # one study's trouble (say, an unreadable header) must not hold the others back
                log.warning("completion check of study %s failed", row.study_instance_uid, exc_info=True)
                continue
            if why:
                self._complete(row.id, why, now)
        sent = self._dispatch_pending(now)
        self._forward_pending(now)
        return sent

    def _due(self, row, now: datetime, sending: bool) -> str | None:
        """Why the study is complete now, or None while it is not."""
        with self.engine.connect() as connection:
            facts = study_facts_from_database(connection, row.id, self.headers)
        decision = route(facts, self.rules)
        quiet_period = self.policy.quiet_period_s if decision.quiet_period_s is None else decision.quiet_period_s
        max_wait = self.policy.max_wait_s if decision.max_wait_s is None else decision.max_wait_s
        quiet_for = (now - as_utc(row.last_received_at)).total_seconds()
        waited = (now - as_utc(row.first_received_at)).total_seconds()
        if waited >= max_wait:
            return f"maximum wait of {max_wait:g}s reached (rule {decision.rule!r})"
        if sending:
            return None
        expected = expected_series_present(decision, facts)
        if expected and all(expected.values()) and quiet_for >= self.policy.expected_series_settle_s:
            found = ", ".join(f"/{pattern}/ -> {description!r}" for pattern, description in expected.items())
            return f"all expected series of rule {decision.rule!r} present ({found})"
        if quiet_for >= quiet_period:
            return f"quiet for {quiet_for:.1f}s (quiet period {quiet_period:g}s) with no association sending"
        return None

    def _complete(self, study_id: int, why: str, now: datetime) -> None:
        with self.engine.begin() as connection:
            study = connection.execute(
                select(studies).where(and_(studies.c.id == study_id, studies.c.status == "receiving"))
            ).first()
            if study is None:
                return
            facts = study_facts_from_database(connection, study_id, self.headers)
            decision = route(facts, self.rules)
            detail = {**decision.detail(), "version": study.version, "notes": list(facts.notes)}
            connection.execute(insert(events).values(
                at=now, kind="completion", study_instance_uid=study.study_instance_uid, reason=why,
                detail={"rule": decision.rule, "pipeline": decision.pipeline, "version": study.version},
            ))
            connection.execute(insert(events).values(
                at=now, kind="routing", study_instance_uid=study.study_instance_uid,
                reason=f"rule {decision.rule!r} -> {decision.pipeline} ({decision.lane}): {decision.reason}",
                detail=detail,
            ))
            run_id = None
            if decision.pipeline == "ignore":
                connection.execute(update(studies).where(and_(studies.c.id == study_id,
                                                              studies.c.version == study.version))
                                   .values(status="ignored", pipeline="ignore"))
            else:
                run_id = self._create_run(connection, study, decision)
                connection.execute(update(studies).where(and_(studies.c.id == study_id,
                                                              studies.c.version == study.version))
                                   .values(status="queued", pipeline=decision.pipeline, dispatched_at=now))
            self._plan_forwards(connection, study, decision, now, run_id)
        # One line each (after the commit, so the log never claims what was rolled back); UIDs, never patient data.
        uid = study.study_instance_uid
        log.info("study %s v%d complete: %d instances over %.1fs (%s)", uid, study.version, study.instance_count,
                 (as_utc(study.last_received_at) - as_utc(study.first_received_at)).total_seconds(), why)
        log.info("study %s v%d routed by rule %r to %s (%s lane)%s", uid, study.version, decision.rule,
                 decision.pipeline, decision.lane, f", run {run_id}" if run_id is not None else "")

    def _create_run(self, connection: Connection, study, decision: RoutingDecision) -> int | None:
        routing = {"rule": decision.rule, "lane": decision.lane,
                   "forward_after": [f.plan() for f in decision.forwards("after")]}
        try:
            with connection.begin_nested():
                return connection.execute(insert(processing_runs).values(
                    study_id=study.id, study_version=study.version, pipeline=decision.pipeline,
                    status="queued", attempts=0, last_image_at=study.last_received_at, lane=decision.lane,
                    routing=routing,
                )).inserted_primary_key[0]
        except IntegrityError:
            log.info("run for study %s version %d exists already", study.study_instance_uid, study.version)
            return None

    def _plan_forwards(self, connection: Connection, study, decision: RoutingDecision, now: datetime,
                       run_id: int | None) -> None:
        folder = (self.store_root / study.study_instance_uid) if self.store_root else Path(study.study_instance_uid)
        for forward in decision.forwards("before"):
            create_forwards(connection, study_id=study.id, study_version=study.version,
                            study_uid=study.study_instance_uid, study_folder=folder, forward=forward,
                            why=f"rule {decision.rule!r} forwards on routing", now=now, run_id=run_id)

    def _dispatch_pending(self, now: datetime) -> list[int]:
        """Hand runs to the broker. A run whose send failed (broker down) stays un-queued and is sent later."""
        with self.engine.connect() as connection:
            pending = connection.execute(
                select(processing_runs.c.id, processing_runs.c.pipeline, processing_runs.c.lane,
                       processing_runs.c.last_image_at, studies.c.study_instance_uid, studies.c.dispatched_at)
                .join(studies, studies.c.id == processing_runs.c.study_id)
                .where(and_(processing_runs.c.status == "queued", processing_runs.c.queued_at.is_(None)))
                .order_by(processing_runs.c.id)
            ).all()
        sent = []
        for run in pending:
            try:
                if self._dispatch_takes_lane:
                    self.dispatch(run.id, run.pipeline, run.lane or "routine")
                else:
                    self.dispatch(run.id, run.pipeline)
            except Exception as exc:
                log.warning("could not dispatch run %d (%s); will retry", run.id, exc)
                break
            with self.engine.begin() as connection:
                connection.execute(update(processing_runs).where(processing_runs.c.id == run.id)
                                   .values(queued_at=now))
            sent.append(run.id)
            since = f", {(now - as_utc(run.last_image_at)).total_seconds():.1f}s after the last image" \
                if run.last_image_at is not None else ""
            log.info("study %s run %d dispatched to queue %s (%s lane)%s", run.study_instance_uid, run.id,
                     run.pipeline, run.lane or "routine", since)
        return sent

    def _forward_pending(self, now: datetime) -> list[int]:
        """Hand forwards planned on routing to the delivery queue (the worker queues those after processing)."""
        if self.forward is None:
            return []
        with self.engine.connect() as connection:
            pending = connection.execute(
                select(deliveries.c.id).where(and_(
                    deliveries.c.kind == "images", deliveries.c.stage == "before",
                    deliveries.c.status == "pending", deliveries.c.queued_at.is_(None)))
                .order_by(deliveries.c.id)
            ).scalars().all()
        sent = []
        for delivery_id in pending:
            try:
                self.forward(delivery_id)
            except Exception as exc:
                log.warning("could not queue forward %d (%s); will retry", delivery_id, exc)
                break
            with self.engine.begin() as connection:
                connection.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(queued_at=now))
            sent.append(delivery_id)
        return sent
