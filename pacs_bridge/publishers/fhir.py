"""FHIR: ``ServiceRequest.priority`` or ``Task.priority`` (code system request-priority: routine | urgent |
asap | stat), changed with a JSON Patch (``PATCH``) or a full ``PUT``.

The study's resources are found by a search (default ``identifier=<accession>``, the order's accession number
as the identifier; with ``identifier_system`` set, ``system|value``). Results are checked for the identifier
again before anything is changed. A missing priority means routine (FHIR: "if missing, normal priority").
Resources that are no longer active (completed, revoked, cancelled, ...) are left alone.

PATCH sends ``test`` on the priority it read before ``replace``: the server applies the change only if the
priority is still the one it read, so a clinician's concurrent change to STAT cannot be overwritten. PUT uses
``If-Match`` with the version it read for the same purpose. With ``add_note`` the change and its reason are
added to the resource's ``note``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from pacs_bridge.publishers.base import PriorityRaiser, PriorityScale, PriorityUpdate, PublisherError, Target
from pacs_bridge.publishers.http import HttpClient

FHIR_JSON = "application/fhir+json"
JSON_PATCH = "application/json-patch+json"
RESOURCES = ("ServiceRequest", "Task")
CLOSED_STATUSES = {"completed", "revoked", "cancelled", "entered-in-error", "failed", "rejected"}


class FhirPriorityPublisher(PriorityRaiser):
    kind = "fhir"
    default_scale: ClassVar[Mapping[str, Any]] = {
        "levels": {"routine": "routine", "urgent": "urgent", "stat": "stat"},
        "ranks": {"routine": 0, "urgent": 1, "asap": 2, "stat": 3}}

    def __init__(self, name: str, url: str, scale: PriorityScale, *, timeout_s: float = 5.0,
                 when_current_unknown: str = "top_only", resource: str = "ServiceRequest",
                 identifier_system: str = "", search: str = "", method: str = "patch", add_note: bool = True,
                 token: str | None = None) -> None:
        super().__init__(name, scale, timeout_s, when_current_unknown)
        if resource not in RESOURCES:
            raise ValueError(f"publisher {name!r}: resource must be one of {RESOURCES}, not {resource!r}")
        if method not in ("patch", "put"):
            raise ValueError(f"publisher {name!r}: method must be patch or put, not {method!r}")
        self.base = url.rstrip("/")
        self.resource = resource
        self.identifier_system = identifier_system
        #: A search parameter template with {accession} and {study_uid}; default: the identifier.
        self.search = search
        self.method = method
        self.add_note = add_note
        self.http = HttpClient(timeout_s, token)

    def _search_params(self, update: PriorityUpdate) -> dict[str, str] | None:
        if self.search:
            name, _, template = self.search.partition("=")
            return {name: template.format(accession=update.accession_number or "",
                                          study_uid=update.study_instance_uid)}
        if not update.accession_number:
            return None
        value = f"{self.identifier_system}|{update.accession_number}" if self.identifier_system \
            else update.accession_number
        return {"identifier": value}

    def _matches(self, resource: dict[str, Any], update: PriorityUpdate) -> bool:
        if self.search:
            return True  # a site-specific search: its answer is trusted
        for identifier in resource.get("identifier") or []:
            if identifier.get("value") == update.accession_number and (
                    not self.identifier_system or identifier.get("system") == self.identifier_system):
                return True
        return False

    def find_targets(self, update: PriorityUpdate, last_known: str | None) -> list[Target]:
        params = self._search_params(update)
        if params is None:
            return []
        response = self.http.request("GET", f"{self.base}/{self.resource}", params=params,
                                     headers={"Accept": FHIR_JSON})
        try:
            bundle = response.json()
        except json.JSONDecodeError as exc:
            raise PublisherError(f"GET {self.base}/{self.resource}: the answer is not JSON: {exc}") from exc
        targets = []
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") or {}
            if resource.get("resourceType") != self.resource or not resource.get("id"):
                continue
            if (entry.get("search") or {}).get("mode", "match") != "match":
                continue
            if not self._matches(resource, update):
                continue
            status = resource.get("status", "")
            closed = f"{self.resource} status is {status}" if status in CLOSED_STATUSES else None
            targets.append(Target(f"{self.resource}/{resource['id']}", resource.get("priority", "routine"),
                                  resource, closed))
        return targets

    def set_priority(self, target: Target, value: str, update: PriorityUpdate, note: str) -> None:
        resource: dict[str, Any] = target.handle
        url = f"{self.base}/{target.id}"
        annotation = {"text": note, "time": datetime.now(UTC).isoformat(timespec="seconds")}
        version = (resource.get("meta") or {}).get("versionId")
        if self.method == "patch":
            operations: list[dict[str, Any]] = []
            if "priority" in resource:
                operations.append({"op": "test", "path": "/priority", "value": resource["priority"]})
            operations.append({"op": "add", "path": "/priority", "value": value})
            if self.add_note:
                if resource.get("note"):
                    operations.append({"op": "add", "path": "/note/-", "value": annotation})
                else:
                    operations.append({"op": "add", "path": "/note", "value": [annotation]})
            headers = {"Content-Type": JSON_PATCH, "Accept": FHIR_JSON}
            if version:
                headers["If-Match"] = f'W/"{version}"'
            self.http.request("PATCH", url, ok=(200, 204), content=json.dumps(operations), headers=headers)
            return
        changed = {**resource, "priority": value}
        if self.add_note:
            changed["note"] = [*(resource.get("note") or []), annotation]
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
        if version:
            headers["If-Match"] = f'W/"{version}"'
        self.http.request("PUT", url, ok=(200, 201), content=json.dumps(changed), headers=headers)
