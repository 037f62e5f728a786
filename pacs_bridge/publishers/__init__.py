"""Worklist publishers: the AI's priority for a study, pushed to the systems that order the reading worklist.

``build_publishers(entries, defaults)`` turns the configuration's ``publishers`` list into publishers:

* ``ups_rs`` (:mod:`.ups_rs`): DICOM UPS workitem priority (0074,1200) over UPS-RS;
* ``hl7v2`` (:mod:`.hl7v2`): HL7 v2 order update (ORM^O01 / OMI^O23) over MLLP;
* ``fhir`` (:mod:`.fhir`): FHIR ServiceRequest or Task priority;
* ``webhook`` (:mod:`.webhook`): a JSON notification of high-priority results.

All share the raise-only rule of :class:`~.base.PriorityRaiser`. This package talks to the outside world only:
the worker decides when to publish and records what happened (``worker.publishing``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pacs_bridge.publishers.base import (
    CREATED,
    FAILED,
    NOTIFIED,
    RAISED,
    REVERTED,
    SKIPPED,
    UNCHANGED,
    PriorityRaiser,
    PriorityScale,
    PriorityUpdate,
    Publication,
    Publisher,
    PublisherConfigError,
    PublisherError,
    read_secret,
)
from pacs_bridge.publishers.fhir import FhirPriorityPublisher
from pacs_bridge.publishers.hl7v2 import Hl7OrderPublisher
from pacs_bridge.publishers.ups_rs import UpsRsPublisher
from pacs_bridge.publishers.webhook import WebhookPublisher

KINDS: dict[str, type[Publisher]] = {cls.kind: cls for cls in (UpsRsPublisher, Hl7OrderPublisher,
                                                                  FhirPriorityPublisher, WebhookPublisher)}

__all__ = [
    "CREATED", "FAILED", "KINDS", "NOTIFIED", "RAISED", "REVERTED", "SKIPPED", "UNCHANGED",
    "FhirPriorityPublisher", "Hl7OrderPublisher", "PriorityRaiser", "PriorityScale", "PriorityUpdate",
    "Publication", "Publisher", "PublisherConfigError", "PublisherError", "UpsRsPublisher",
    "WebhookPublisher",
    "build_publisher", "build_publishers",
]

_COMMON = {"name", "kind", "levels", "ranks", "timeout_s", "enabled"}
_OPTIONS: dict[str, set[str]] = {
    "ups_rs": {"url", "when_current_unknown", "match", "create_if_missing", "worklist_label", "token_env",
               "token_file"},
    "hl7v2": {"host", "port", "when_current_unknown", "message", "version", "legacy_priority_fields",
              "sending_application", "sending_facility", "receiving_application", "receiving_facility"},
    "fhir": {"url", "when_current_unknown", "resource", "identifier_system", "search", "method", "add_note",
             "token_env", "token_file"},
    "webhook": {"url", "min_priority", "secret_env", "secret_file", "token_env", "token_file", "headers"},
}
_REQUIRED = {"ups_rs": ("url",), "hl7v2": ("host", "port"), "fhir": ("url",), "webhook": ("url",)}


def build_publisher(entry: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Publisher:
    """One publisher from a configuration entry; ``defaults`` are the ``publishing`` section's per-kind scales
    and options. A malformed entry raises :class:`PublisherConfigError` naming it and the key."""
    defaults = defaults or {}
    name, kind = entry.get("name"), entry.get("kind")
    where = f"publisher {name!r}"
    if not name:
        raise PublisherConfigError(f"publisher entry {dict(entry)!r} has no name")
    if kind not in KINDS:
        raise PublisherConfigError(f"{where}: kind must be one of {sorted(KINDS)}, not {kind!r}")
    unknown = set(entry) - _COMMON - _OPTIONS[kind]
    if unknown:
        raise PublisherConfigError(f"{where}: unknown keys {sorted(unknown)}; known: "
                                   f"{sorted(_COMMON | _OPTIONS[kind])}")
    missing = [key for key in _REQUIRED[kind] if not entry.get(key)]
    if missing:
        raise PublisherConfigError(f"{where}: {kind} needs {missing}")
    cls = KINDS[kind]
    scale = PriorityScale.from_config((defaults.get("scales") or {}).get(kind) or cls.default_scale, entry)
    options = {key: entry[key] for key in _OPTIONS[kind]
               if key in entry and not key.endswith(("_env", "_file"))}
    options.setdefault("timeout_s", float(entry.get("timeout_s", defaults.get("timeout_s", 5.0))))
    if "when_current_unknown" in _OPTIONS[kind]:
        options.setdefault("when_current_unknown", defaults.get("when_current_unknown", "top_only"))
    if kind in ("ups_rs", "fhir", "webhook"):
        options["token"] = read_secret(entry, "token", where)
    if kind == "webhook":
        options["secret"] = read_secret(entry, "secret", where)
        options.setdefault("min_priority", defaults.get("webhook_min_priority", "stat"))
    try:
        if kind == "hl7v2":
            return cls(name, options.pop("host"), int(options.pop("port")), scale, **options)
        return cls(name, options.pop("url"), scale, **options)
    except (TypeError, ValueError) as exc:
        raise PublisherConfigError(f"{where}: {exc}") from exc


def build_publishers(entries: Sequence[Mapping[str, Any]], defaults: Mapping[str, Any] | None = None
                     ) -> list[Publisher]:
    publishers = [build_publisher(entry, defaults) for entry in entries if entry.get("enabled", True)]
    names = [p.name for p in publishers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PublisherConfigError(f"publisher names must be unique; repeated: {duplicates}")
    return publishers
