"""Forwarding a study's images, as received, to named destinations: routing as a router.

A routing rule may forward a study on routing (``stage: before``) or after processing, if the AI result satisfies
a condition (``stage: after``). Each forward is one ``deliveries`` row of kind ``images`` per (study version,
destination), listing the files it sends, and goes through the same reliable delivery as SRs (a Celery task per
row, retries with backoff, dead letters, ``triage deliveries retry``). Only image objects are forwarded: SRs and
other derived objects in the study are never sent on, so a forward can never start a loop.

The files are sent by :func:`pacs_bridge.sender.send_files`, as SRs are. A destination that already holds an
instance simply stores it again, so a retried forward that had sent part of the study is harmless.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import and_, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from pacs_bridge.routing import is_derived_object
from pacs_bridge.rules import Forward
from sql.schema import deliveries, events, instances, series


def study_image_paths(connection: Connection, study_id: int) -> list[str]:
    """The files of the study's image objects as received, series by series (derived objects left out)."""
    rows = connection.execute(
        select(series.c.modality, instances.c.sop_class_uid, instances.c.path)
        .select_from(series.join(instances, instances.c.series_id == series.c.id))
        .where(series.c.study_id == study_id)
        .order_by(series.c.series_number, series.c.id, instances.c.path)
    ).all()
    return [r.path for r in rows if not is_derived_object(r.modality or "", r.sop_class_uid)]


def create_forwards(connection: Connection, *, study_id: int, study_version: int, study_uid: str, study_folder: Path,
                    forward: Forward, why: str, now: datetime, run_id: int | None = None) -> list[int]:
    """One pending ``images`` delivery per destination of ``forward`` (an existing one is kept: idempotent).

    Returns the ids of the rows created now. The caller's transaction commits them; whoever queues them must set
    ``queued_at`` (the assembler for forwards on routing; the worker for forwards after processing).
    """
    paths = study_image_paths(connection, study_id)
    created = []
    for destination in forward.destinations:
        exists = connection.execute(select(deliveries.c.id).where(and_(
            deliveries.c.study_id == study_id, deliveries.c.study_version == study_version,
            deliveries.c.destination == destination, deliveries.c.kind == "images"))).first()
        if exists is not None:
            continue
        try:
            with connection.begin_nested():
                delivery_id = connection.execute(insert(deliveries).values(
                    run_id=None, destination=destination, kind="images", stage=forward.stage, study_id=study_id,
                    study_version=study_version, path=str(study_folder), files=paths, status="pending",
                    attempts=0, created_at=now,
                )).inserted_primary_key[0]
        except IntegrityError:  # another process planned the same forward a moment ago
            continue
        created.append(delivery_id)
        connection.execute(insert(events).values(
            at=now, kind="forward", study_instance_uid=study_uid,
            reason=f"forward {len(paths)} image(s) of version {study_version} to {destination} "
                   f"({forward.stage} processing): {why}",
            detail={"delivery_id": delivery_id, "destination": destination, "stage": forward.stage,
                    "study_version": study_version, "run_id": run_id, "files": len(paths)},
        ))
    return created
