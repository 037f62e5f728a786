"""Configuration: one YAML file, embedded defaults, environment overrides.

The file is ``triage.yaml`` in the working directory, or the path in ``TRIAGE_CONFIG``. Every key can be
overridden by an environment variable named ``TRIAGE_<SECTION>__<KEY>`` (double underscore between levels),
for example ``TRIAGE_SCP__PORT=11113`` or ``TRIAGE_DATABASE__URL=postgresql+psycopg2://...``. Values from the
environment are parsed as YAML scalars, so ``true``, ``10`` and ``[A, B]`` have their natural types.

The embedded defaults need no server: SQLite under ``var/``, Celery's filesystem transport as the broker, and
SRs written to ``var/outbox/`` when no destination is configured. Production points at Postgres, Redis and real
PACS destinations (see ``ops/triage.production.yaml``).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Every key the service reads, with its default. The documentation of each key lives here, beside its value.
DEFAULTS: dict[str, Any] = {
    # Folder for received images (incoming/), rejected input (quarantine/), SRs (outbox/), the embedded broker
    # (broker/) and the SQLite database. Relative paths are taken from the working directory.
    "var_dir": "var",
    "database": {
        # SQLAlchemy URL. Empty: SQLite file <var_dir>/triage.db.
        "url": "",
    },
    "broker": {
        # Celery broker URL. Empty: Celery's filesystem transport under <var_dir>/broker (no server needed).
        "url": "",
        # Redis visibility timeout; must exceed the longest queue wait plus run time (unacked tasks are redelivered).
        "visibility_timeout_s": 7200,
    },
    "scp": {
        "ae_title": "TRIAGE",
        "host": "127.0.0.1",
        "port": 11112,
        # Calling AE titles allowed to associate. Empty list: any calling AE title is accepted.
        "allowed_calling_aets": [],
        "max_pdu": 131072,
        "max_associations": 10,
        # Seconds without any PDU after which an idle association is aborted.
        "network_timeout_s": 60,
    },
    "assembly": {
        # A study is complete when no instance has arrived for this many seconds and no association is still
        # sending it...
        "quiet_period_s": 10.0,
        # ... or, whatever else, this many seconds after its first instance arrived.
        "max_wait_s": 900.0,
        # How often the completion check runs.
        "poll_interval_s": 1.0,
    },
    "model": {
        # Path to a model bundle folder (manifest.json + weights). Required for processing; never downloaded.
        "bundle": "",
        # "auto" uses CUDA when available, else the CPU.
        "device": "auto",
        # The study description the Prima study encoder is conditioned on.
        "study_description": "MRI BRAIN WO AND W CONTRAST",
        # How many diagnoses the SR reports: those above threshold, topped up to this many by probability.
        "report_top_k": 5,
        # Prima priority classes -> worklist priority (a clinical configuration).
        "priority_map": {"none": "routine", "low": "urgent", "medium": "urgent", "high": "stat"},
        # Referral heads whose probability reaches this value are reported.
        "referral_threshold": 0.5,
    },
    # Where SRs go. Each: {name, kind: dicom, host, port, ae_title}. Empty: SRs stay in <var_dir>/outbox only.
    "destinations": [],
    "delivery": {
        "attempts": 3,
        "backoff_s": 2.0,
        # Our calling AE title when sending.
        "ae_title": "TRIAGE",
    },
    "metrics": {
        # /metrics, /healthz and /readyz of `triage serve` and of each `triage worker` (0 = not served).
        "host": "127.0.0.1",
        "serve_port": 9101,
        "worker_port": 0,
    },
    "api": {
        "host": "127.0.0.1",
        "port": 8080,
        # Bearer tokens: each {token_file | token_env, name, role}. Roles: radiologist (read), admin (everything).
        # Tokens are read from files or the environment, never written in this file.
        "tokens": [],
    },
    "worker": {
        # A stable identifier of this deployment's device, written as the SR's Device Observer UID.
        "device_uid": "",
        "name": "triage-worker",
        "institution_name": "",
        # Hard time limit for one study's processing; the soft limit is 90 % of it.
        "task_time_limit_s": 1800,
        "max_attempts": 3,
    },
    # Turnaround and fairness (train/fairness) and final-report intake (pacs_bridge/hl7_intake, POST /reports).
    "fairness": {
        # A radiologist turnaround (examination to final report) longer than each of these is "long"; the report
        # gives the odds of a long turnaround per group against its reference group, for each threshold.
        "long_turnaround_days": [3, 7],
        # Groups with fewer studies than this are listed but not tested (odds ratios).
        "min_group_size": 30,
        # Groups with fewer units than this (positives for TPR, negatives for FPR) are not tested.
        "min_group_units": 20,
        # Sensitive attributes analysed one by one, and the pairs analysed as intersectional groups.
        "attributes": ["sex", "age_band", "ethnic_group", "region", "density_quartile", "scheduling",
                       "scanner_manufacturer", "scanner_model", "insurance_class"],
        "intersections": [["sex", "age_band"], ["region", "scheduling"]],
        # attribute -> reference group for the odds ratios, e.g. {region: south}. Unset: the largest known group.
        "reference_groups": {},
        # Lower edges of the age bands after the first, in years: 0-17, 18-39, 40-64, 65-79, 80+.
        "age_band_edges": [18, 40, 65, 80],
        # CSV postcode_prefix,region,density_quartile. Empty: the fictional example in pacs_bridge/data.
        "postcode_table": "",
        # Public holidays (YYYY-MM-DD): examinations on them are scheduled "holiday" rather than weekday/weekend.
        "holidays": [],
        # Time zone of HL7 and DICOM times written without an offset, and of the weekday/weekend calendar.
        "timezone": "UTC",
        # TPR/FPR disparity bootstrap: units drawn per iteration from the group (and as many diagnosis-matched from
        # the population), iterations, and the seed that makes a refresh reproducible.
        "bootstrap": {"sample_size": 200, "iterations": 20, "seed": 20240601},
        "alpha": 0.05,
        # Multiple-testing correction within each family of tests: holm (family-wise), bh (false discovery rate).
        "correction": "holm",
        # A TPR/FPR disparity smaller than this is not flagged, however small its p-value.
        "min_disparity": 0.05,
        # Seconds between scheduled refreshes (`triage fairness refresh --every`); 0: once and exit.
        "refresh_interval_s": 3600,
        # Port for Prometheus metrics of the scheduled refresh; 0: not served.
        "metrics_port": 0,
        # Where the scheduled refresh writes the HTML report. Empty: <var_dir>/fairness/report.html.
        "report_path": "",
        # HL7 v2 ORU^R01 final-report listener (MLLP). 2575 is the registered HL7 port.
        "mllp_host": "127.0.0.1",
        "mllp_port": 2575,
        # MSH-3/MSH-4 of our acknowledgements.
        "mllp_application": "TRIAGE",
        "mllp_facility": "",
        # Kept rejected and failed HL7 messages. Empty: <var_dir>/hl7.
        "hl7_kept_dir": "",
    },
}


@dataclass
class Settings:
    """The merged configuration, with a few derived paths."""

    raw: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULTS))

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    @property
    def var_dir(self) -> Path:
        return Path(self.raw["var_dir"]).resolve()

    @property
    def incoming_dir(self) -> Path:
        return self.var_dir / "incoming"

    @property
    def quarantine_dir(self) -> Path:
        return self.var_dir / "quarantine"

    @property
    def outbox_dir(self) -> Path:
        return self.var_dir / "outbox"

    @property
    def database_url(self) -> str:
        return self.raw["database"]["url"] or f"sqlite:///{self.var_dir / 'triage.db'}"

    @property
    def broker_url(self) -> str:
        return self.raw["broker"]["url"] or "filesystem://"

    @property
    def device_uid(self) -> str:
        """The configured device UID, or one derived from the deployment's var folder (stable per deployment)."""
        from pydicom.uid import generate_uid

        return self.raw["worker"]["device_uid"] or generate_uid(entropy_srcs=["triage-device", str(self.var_dir)])


def _merge(base: dict[str, Any], override: dict[str, Any], where: str = "") -> None:
    for key, value in override.items():
        if key not in base:
            raise KeyError(f"unknown configuration key {where}{key!r}; known keys: {sorted(base)}")
        if isinstance(base[key], dict) and base[key] and isinstance(value, dict):
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def _environment_overrides(environ: dict[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith("TRIAGE_") or name == "TRIAGE_CONFIG":
            continue
        path = name[len("TRIAGE_"):].lower().split("__")
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(text) if text != "" else ""
    return overrides


def load_settings(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults, then the YAML file (if any), then ``TRIAGE_*`` environment variables."""
    environ = dict(os.environ if environ is None else environ)
    raw = copy.deepcopy(DEFAULTS)
    path = path or environ.get("TRIAGE_CONFIG") or ("triage.yaml" if Path("triage.yaml").exists() else None)
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the configuration must be a mapping, not {type(loaded).__name__}")
        _merge(raw, loaded)
    _merge(raw, _environment_overrides(environ))
    return Settings(raw)
