"""A webhook for high-priority findings: one JSON POST per study when its AI priority reaches
``min_priority``.

It changes nothing anywhere, so it has no original value to keep; it only promises not to repeat itself: a
study already notified at a priority is not notified again unless a revised result raises it further. The body
is signed (``X-Triage-Signature: sha256=<HMAC of the body>``) when a secret is configured, so the receiver can
tell it from a forgery. The body carries the study and order identifiers, never the patient's.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from pacs_bridge.publishers.base import (
    NOTIFIED,
    SKIPPED,
    UNCHANGED,
    PriorityScale,
    PriorityUpdate,
    Publication,
    Publisher,
    PublisherConfigError,
    PublisherError,
)
from pacs_bridge.publishers.http import HttpClient
from pacs_bridge.results import PRIORITIES

SIGNATURE_HEADER = "X-Triage-Signature"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookPublisher(Publisher):
    kind = "webhook"
    default_scale: ClassVar[Mapping[str, Any]] = {
        "levels": {p: p for p in PRIORITIES}, "ranks": {p: i for i, p in enumerate(PRIORITIES)}}

    def __init__(self, name: str, url: str, scale: PriorityScale, *, timeout_s: float = 5.0,
                 min_priority: str = "stat", secret: str | None = None, token: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(name, scale, timeout_s)
        if min_priority not in PRIORITIES:
            raise PublisherConfigError(f"publisher {name!r}: min_priority must be one of {PRIORITIES}, "
                                       f"not {min_priority!r}")
        self.url = url
        self.min_priority = min_priority
        self.secret = secret
        self.http = HttpClient(timeout_s, token, headers)

    def payload(self, update: PriorityUpdate) -> dict[str, Any]:
        return {
            "event": "triage.priority",
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "study_instance_uid": update.study_instance_uid,
            "accession_number": update.accession_number,
            "study_description": update.study_description,
            "priority": update.priority,
            "reason": update.reason,
            "findings": [{"label": label, "probability": round(p, 4)} for label, p in update.findings],
            "referrals": list(update.referrals),
            "model": {"name": update.model_name, "version": update.model_version},
            "run_id": update.run_id,
            "worklist_url": update.worklist_url,
        }

    def publish(self, update: PriorityUpdate, last_known: str | None = None) -> list[Publication]:
        target = self.url
        if PRIORITIES.index(update.priority) < PRIORITIES.index(self.min_priority):
            return [self._publication(target, SKIPPED, update,
                                      f"{update.priority} is below min_priority {self.min_priority}")]
        known = self.scale.rank(last_known)
        if known is not None and self.scale.rank(update.priority) <= known:
            return [self._publication(target, UNCHANGED, update, f"already notified at {last_known}",
                                      last_known)]
        body = json.dumps(self.payload(update), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers[SIGNATURE_HEADER] = signature(self.secret, body)
        try:
            self.http.request("POST", self.url, ok=tuple(range(200, 300)), content=body, headers=headers)
        except PublisherError as exc:
            return [self._publication(target, "failed", update, str(exc), last_known, update.priority)]
        return [self._publication(target, NOTIFIED, update, f"notified: {update.reason}", last_known,
                                  update.priority)]
