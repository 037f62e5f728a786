"""Configuration: one YAML file, embedded defaults, environment overrides, read into typed settings.

The file is ``triage.yaml`` in the working directory, or the path in ``TRIAGE_CONFIG``. Every key can be
overridden by an environment variable named ``TRIAGE_<SECTION>__<KEY>`` (double underscore between levels),
for example ``TRIAGE_SCP__PORT=11113`` or ``TRIAGE_DATABASE__URL=postgresql+psycopg2://...``. Values from the
environment are parsed as YAML scalars, so ``true``, ``10`` and ``[A, B]`` have their natural types. A variable
named for a key plus ``_FILE`` (``TRIAGE_DATABASE__URL_FILE=/run/secrets/db``) gives the content of that file.

Each section is one pydantic model below; every key's default and documentation are written once, on its field.
A value of the wrong type fails at load, naming the key (``scp.port: Input should be a valid integer``), and an
unknown key (a typo) is refused with its name. The receiver's section is :class:`pacs_bridge.scp.ScpSettings`,
composed here, so the receiver and the configuration share one set of defaults.

The embedded defaults need no server: SQLite under ``var/``, Celery's filesystem transport as the broker, and
SRs written to ``var/outbox/`` when no destination is configured. Production points at Postgres, Redis and real
PACS destinations (see ``ops/triage.production.yaml``).
"""
from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources import DefaultSettingsSource, InitSettingsSource, YamlConfigSettingsSource

from pacs_bridge.scp_settings import ScpSettings


class Section(BaseModel):
    """One section of the configuration: unknown keys are refused, assignments (tests, live changes) validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


#: Free-form entries (routing rules, destinations, publishers, ...): each has its own grammar, checked by the
#: module that compiles it (pacs_bridge.rules, pacs_bridge.publishers, ...) when the service starts.
Entries = list[dict[str, Any]]


class DatabaseSettings(Section):
    url: str = Field("", description="SQLAlchemy URL. Empty: SQLite file <var_dir>/triage.db.")


class BrokerSettings(Section):
    url: str = Field("", description=(
        "Celery broker URL. Empty: Celery's filesystem transport under <var_dir>/broker (no server needed)."))
    visibility_timeout_s: float = Field(7200, description=(
        "Redis visibility timeout; must exceed the longest queue wait plus run time (unacked tasks are "
        "redelivered)."))
    consumer_check_interval_s: float = Field(60, description=(
        "How often `triage serve` asks the workers which queues they consume (one broadcast, 1 s timeout); a "
        "routed pipeline's queue (or the delivery queue) that no worker consumes raises "
        "triage_queue_without_consumer and, while messages wait in it, a `queue_without_consumer` event."))


class StoreSettings(Section):
    fsync: bool = Field(True, description=(
        "fsync each received file and its folder before the sender is told Success (a power cut loses nothing "
        "that was acknowledged; about 0.6 ms an image here). false only for throw-away stores."))
    reconcile_interval_s: float = Field(300, description=(
        "The store is the truth: at start-up and then every reconcile_interval_s seconds, files in "
        "<var_dir>/incoming without a database row (the process died between the two) are recorded through the "
        "same checks, or quarantined."))
    reconcile_grace_s: float = Field(120, description=(
        "Files younger than this are left to the bookkeeper writing them."))


class AssemblySettings(Section):
    quiet_period_s: float = Field(10.0, description=(
        "A study is complete when no instance has arrived for this many seconds and no association is still "
        "sending it..."))
    max_wait_s: float = Field(900.0, description="... or, whatever else, this many seconds after its first instance "
                              "arrived.")
    poll_interval_s: float = Field(1.0, description="How often the completion check runs.")
    expected_series_settle_s: float = Field(2.0, description=(
        "When a routing rule's expected series are all present, the study is complete once nothing has arrived "
        "for this long and no association is sending it (so the last series is not cut), without the quiet "
        "period."))


class RoutingSettings(Section):
    """Routing (pacs_bridge/rules.py has the full grammar)."""

    rules: Entries = Field(
        default_factory=lambda: [{"name": "mr-to-neuro", "match": {"tag": "Modality", "equals": "MR"},
                                  "pipeline": "neuro_mri", "lane": "routine"}],
        description=(
            "Each rule: {name, match, pipeline, lane, quiet_period_s, max_wait_s, expected_series, forward}. "
            "match: a condition. {all: [...]}, {any: [...]}, {not: ...}, or {tag: NAME, OP: VALUE} where NAME is a "
            "DICOM keyword (Modality, BodyPartExamined, StudyDescription, SeriesDescription, Manufacturer, ...) or "
            "calling_aet | called_aet | peer_address | source (c-store, stow-rs, c-get, wado-rs), and OP is equals "
            "(a value or a list), regex (Python re.search), range ([low, high], null = open; ages in years) or "
            "present (true/false). A test holds when any image series' value passes it. "
            "pipeline: neuro_mri | slice_knn | ignore. lane: urgent | routine (urgent runs are taken first). "
            "quiet_period_s, max_wait_s: this study's completion timings (default: the assembly section's). "
            "expected_series: SeriesDescription regexes; the study is complete as soon as each matches a series. "
            "forward: [{to: [DESTINATION, ...], stage: before | after, if: CONDITION}], sending the study's images "
            "as received to destinations named under `destinations`: before = on routing; after = once processed, "
            "if the AI result satisfies `if` ({result: priority | findings | reported | referrals | model_name | "
            "model_version | probability:LABEL, OP: VALUE}; e.g. {result: priority, equals: stat}, or "
            "{not: {result: findings, present: true}} for \"no finding\")."))
    fallback: dict[str, Any] = Field(
        default_factory=lambda: {"name": "fallback", "pipeline": "ignore", "lane": "routine", "quiet_period_s": None,
                                 "max_wait_s": None, "expected_series": [], "forward": []},
        description="Applies when no rule matches: the same keys as a rule, without `match`.")


class PullSettings(Section):
    sources: Entries = Field(default_factory=list, description=(
        "Where to pull from. Each: {name, kind: dicom, host, port, ae_title, tls} (C-FIND, C-MOVE, C-GET) or "
        "{name, kind: dicomweb, url} (QIDO-RS, WADO-RS). The first of the right kind is used unless --source names "
        "one."))
    calling_aet: str = Field("", description="Our AE title towards the PACS. Empty: scp.ae_title.")
    move_destination: str = Field("", description=(
        "The C-MOVE destination: the AE title under which the PACS knows our SCP. Empty: scp.ae_title."))
    pause_s: float = Field(2.0, description="Seconds between two studies of a backfill, so the PACS keeps serving "
                           "its users.")
    query_window_days: int = Field(7, description=(
        "A backfill queries the PACS this many days at a time (PACSs cap the answers to one query)."))
    timeout_s: float = Field(600, description=(
        "Seconds one study's retrieval may take (a C-MOVE, C-GET or WADO-RS request) before it is given up."))


class ModelSettings(Section):
    bundle: str = Field("", description=(
        "Path to a model bundle folder (manifest.json + weights). Required for processing; never downloaded."))
    device: str = Field("auto", description='"auto" uses CUDA when available, else the CPU.')
    cpu_threads: int = Field(0, description=(
        "Threads of one worker process's model pass on the CPU (0: torch's default, one per core). With several "
        "worker processes on one host, give each cores / processes: more threads than cores in all make the model "
        "pass many times slower (they wait on each other), not faster."))
    study_description: str = Field("MRI BRAIN WO AND W CONTRAST", description=(
        "The study description the Prima study encoder is conditioned on."))
    report_top_k: int = Field(5, description=(
        "How many diagnoses the SR reports: those above threshold, topped up to this many by probability."))
    priority_map: dict[Literal["none", "low", "medium", "high"], str] = Field(
        default_factory=lambda: {"none": "routine", "low": "urgent", "medium": "urgent", "high": "stat"},
        description="Prima priority classes (none, low, medium, high) -> worklist priority (a clinical "
                    "configuration).")
    referral_threshold: float = Field(0.5, description="Referral heads whose probability reaches this value are "
                                      "reported.")
    report_absent: list[str] = Field(default_factory=list, description=(
        "Diagnosis labels the site has the model rule out: below their threshold they are reported (in the SR) as "
        "explicitly Absent, beside the called (Present) findings and the rest of the differential (Undetermined)."))


class GatePolicySettings(Section):
    """One pipeline's input adequacy policy (worker/input_gate.py)."""

    modalities: list[str] = Field(default_factory=lambda: ["MR"], description=(
        "Series of other modalities do not count."))
    body_part_regex: str = Field(r"(?i)^(brain|head|skull|cerebrum|neuro|headneck|head_neck)$", description=(
        "Python re.search on BodyPartExamined; empty: any."))
    accept_missing_body_part: bool = Field(True, description=(
        "Series without BodyPartExamined count, as many scanners leave it empty."))
    required_series: list[str] | None = Field(None, description=(
        "SeriesDescription patterns, each must match a series that counts; null: the routing rule's "
        "expected_series, with the same matching as completion; []: none."))
    min_slices: int = Field(12, description=(
        "Distinct slice positions a series needs to count; at least one series must count. neuro_mri: the study "
        "encoder tokenises 4-slice blocks over the brain (about 140 mm head to foot)."))
    min_coverage_mm: float = Field(80.0, description=(
        "Coverage along the slice normal (first to last slice plus one slice thickness) a series needs to count. "
        "CR/DX images have no slice geometry: their coverage counts as 0 mm."))


class SliceKnnGateSettings(GatePolicySettings):
    modalities: list[str] = Field(default_factory=lambda: ["CT", "CR", "DX", "MR"],
                                  description="Series of other modalities do not count.")
    body_part_regex: str = Field("", description="Python re.search on BodyPartExamined; empty: any.")
    min_slices: int = Field(1, description="Distinct slice positions a series needs to count.")
    min_coverage_mm: float = Field(0.0, description=(
        "Coverage along the slice normal a series needs to count (CR/DX images have no slice geometry: their "
        "coverage counts as 0 mm)."))


class InputGateSettings(Section):
    """The input adequacy gate (worker/input_gate.py), checked from the image headers before the model runs."""

    enabled: bool = True
    write_sr: bool = Field(True, description=(
        "Write an SR for a study that is not analysed (to the same destinations as results). false: none."))
    neuro_mri: GatePolicySettings = Field(default_factory=GatePolicySettings)
    slice_knn: SliceKnnGateSettings = Field(default_factory=SliceKnnGateSettings)


class ExplainSettings(Section):
    enabled: bool = Field(True, description=(
        "LIME over the volume tokens of the series that carries each positive finding; the top tokens become "
        "image regions in the SR. Each sample is one forward pass of the series and study ViTs."))
    samples: int = 64
    top_tokens: int = 3
    max_findings: int = 2


class SliceEvidenceSettings(Section):
    enabled: bool = True
    weights: str = Field("", description=(
        "The official weights file (medimageinsigt-v1.0.0.pt, a safetensors file). Empty: no evidence, except "
        "with config tiny (a seeded random model, for the demo and tests). Never downloaded."))
    config: Literal["full", "tiny"] = Field("full", description=(
        "full (the published network) | tiny (same structure, small widths)"))
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=(
        "auto: bf16 on a GPU, fp32 on a CPU | fp32 | bf16"))
    batch_size: int = 16
    max_slices_per_series: int = Field(8, description=(
        "An evenly spaced subset of each series' slices, and at most max_series series (the largest) per study."))
    max_series: int = 8
    index_path: str = Field("", description=(
        "The faiss index file (a cache of the slice_embeddings table). Empty: <var_dir>/index/slices.faiss. The "
        "index is partitioned by the study's modality and body region (one file each, slices.MR-HEAD.faiss, ...): "
        "a study is compared only with studies of its own partition, so brain MRs never list CT heads as "
        "similar."))
    reference_key_file: str = Field("", description=(
        "The site key of the pseudonymous references by which an SR names similar prior studies (never by their "
        "UIDs: they are other patients' studies); the worklist resolves them for authorised users. Empty: a "
        "random key made once at <var_dir>/keys/study-reference.key. Workers on several hosts must share one key "
        "file."))
    exact_max: int = Field(200000, description=(
        "Exact search up to exact_max studies; beyond it ivf (nprobe lists searched) or hnsw."))
    approximate: str = "ivf"
    nprobe: int = 32
    k: int = Field(20, description="Neighbours that vote in kNN classification (the paper's k).")
    evidence_k: int = Field(5, description="Similar prior studies reported.")
    min_similarity: float = Field(0.0, description="Prior studies less similar than this are not reported as "
                                  "evidence.")
    finding_threshold: float = Field(0.5, description=(
        "slice_knn: a label is a finding from this kNN score on (scores are similarity-weighted vote fractions)."))
    priority_of_findings: dict[str, str] = Field(default_factory=dict, description=(
        "slice_knn: finding label -> worklist priority (routine | urgent | stat); the highest positive one wins."))


class ZeroShotSettings(Section):
    enabled: bool = True
    slice_prompts: str = "slice_findings"
    prima_prompts: str = "prima_diagnoses"
    knn_weight: float = 0.5
    threshold: float = Field(0.5, description="A zero-shot score from this on makes the finding positive.")


class DeliverySettings(Section):
    attempts: int = Field(0, description="Also give up after this many attempts (0: no limit but retry_for_s).")
    backoff_s: float = 10.0
    max_backoff_s: float = 600.0
    retry_for_s: float = 28800.0
    ae_title: str = Field("TRIAGE", description="Our calling AE title when sending.")


class MetricsSettings(Section):
    """/metrics, /healthz and /readyz of `triage serve` and of each `triage worker` (0 = not served)."""

    host: str = "127.0.0.1"
    serve_port: int = 9101
    worker_port: int = 0


class TlsSettings(Section):
    """PEM certificate and key (no cert: plain TCP/HTTP); ca + require_client_cert: peers must present a
    certificate signed by ca (mutual TLS)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = False


class ApiOidcSettings(Section):
    issuer: str = ""
    audience: str = ""
    jwks_url: str = ""
    jwks_file: str = ""
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    role_claim: str = "roles"
    role_map: dict[str, str] = Field(default_factory=dict)
    name_claim: str = "preferred_username"
    leeway_s: float = 30
    jwks_cache_s: float = 300
    jwks_timeout_s: float = 5


class ApiSettings(Section):
    host: str = "127.0.0.1"
    port: int = 8080
    tokens: Entries = Field(default_factory=list, description=(
        "Bearer tokens: each {token_file | token_env, name, role}. Roles: radiologist (read), sender (store images "
        "by STOW-RS: POST /dicom-web/studies), admin (everything). Tokens are read from files or the environment, "
        "never written in this file."))
    session_max_age_s: int = Field(43200, description=(
        "Signing in on the worklist also opens a browser session (an HttpOnly, SameSite=Strict cookie signed with "
        "the token) for the pages a browser navigates to, such as /fairness; it ends after this many seconds."))
    tls: TlsSettings = Field(default_factory=TlsSettings, description=(
        "HTTPS: PEM certificate and key (no cert: plain HTTP, for loopback only). ca + require_client_cert: "
        "clients must also present a certificate signed by ca."))
    token_cache_s: float = Field(2.0, description=(
        "Tokens live in the database (hashes), shared by every API replica; a replica caches an accepted token "
        "this many seconds, so a revoked one (POST /admin/tokens/reload on any replica) is refused everywhere after "
        "it."))
    oidc: ApiOidcSettings = Field(default_factory=ApiOidcSettings, description=(
        "OpenID Connect bearer tokens (JWTs) from the hospital's identity provider, beside the static tokens: "
        "issuer and audience must match, keys from jwks_url (or jwks_file), the role from role_claim (a dotted "
        "path, e.g. realm_access.roles) through role_map ({provider role: radiologist|sender|admin}). No issuer: "
        "off."))
    max_body_bytes: int = Field(8388608, description=(
        "Request limits. A body larger than this is refused (413) while it streams in; STOW-RS is limited per "
        "instance by scp.max_object_bytes instead. A request whose headers take longer than header_timeout_s, or "
        "whose body pauses longer than body_timeout_s, is cut off; at most max_connections are served at once "
        "(503 beyond). Idle keep-alive connections close after keep_alive_s."))
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 200
    keep_alive_s: int = 5


class WorkerSettings(Section):
    device_uid: str = Field("", description=(
        "A stable identifier of this deployment's device, written as the SR's Device Observer UID. Empty: one "
        "derived from var_dir."))
    name: str = "triage-worker"
    institution_name: str = ""
    task_time_limit_s: float = Field(1800, description=(
        "Hard time limit for one study's processing; the soft limit is 90 % of it."))
    max_attempts: int = 3
    redispatch_after_s: float = Field(900, description=(
        "A run queued this long without a worker starting it, or a delivery pending this long, is handed to the "
        "broker again (its message may have been lost, e.g. Redis restarted without persistence)."))
    batch_size: int = Field(4, description=(
        "Micro-batching: a worker runs up to this many ready studies through the model together, waiting at most "
        "batch_wait_s for companions of the study it was handed (1 = no batching)."))
    batch_wait_s: float = 0.1
    load_processes: int = Field(0, description=(
        "Studies are loaded (DICOM read, decode, resample) in a pool of this many processes per worker process "
        "(0: as many as the machine has cores; 1 and more: that many; -1: in the worker process itself)."))
    prefetch_batches: int = Field(8, description=(
        "While a batch is in the model, the next ready studies are claimed and loaded: how many batches one task "
        "may take in a row before it hands back to the queue; 1 = no prefetch."))
    starvation_after_s: float = Field(600, description=(
        "Urgent-lane runs are taken first; a routine run that has waited this long is taken as if urgent."))


class PriorityScale(Section):
    """AI priority (routine/urgent/stat) -> one system's value, and the rank of every value it may hold."""

    levels: dict[str, str]
    ranks: dict[str, int]


def _default_scales() -> dict[str, PriorityScale]:
    return {
        "ups_rs": PriorityScale(levels={"routine": "LOW", "urgent": "MEDIUM", "stat": "HIGH"},
                                ranks={"LOW": 0, "MEDIUM": 1, "HIGH": 2}),
        "hl7v2": PriorityScale(levels={"routine": "R", "urgent": "A", "stat": "S"},
                               ranks={"PRN": 0, "R": 0, "P": 1, "C": 1, "T": 2, "A": 2, "S": 3}),
        "fhir": PriorityScale(levels={"routine": "routine", "urgent": "urgent", "stat": "stat"},
                              ranks={"routine": 0, "urgent": 1, "asap": 2, "stat": 3}),
    }


class PublishingSettings(Section):
    scales: dict[str, PriorityScale] = Field(default_factory=_default_scales, description=(
        "AI priority (routine/urgent/stat) -> each system's value, and the rank of every value a system may hold "
        "(a clinician's value the scale does not rank counts as possibly higher). A clinical configuration."))
    when_current_unknown: Literal["top_only", "always", "never"] = Field("top_only", description=(
        "When the current priority cannot be read (HL7 v2 with nothing recorded yet): top_only sends only the "
        "highest value (which cannot lower anything), always sends, never skips."))
    timeout_s: float = Field(5.0, description="Seconds per request: publishing runs inside the study's processing "
                             "task.")
    webhook_min_priority: str = Field("stat", description=(
        "Webhooks notify at this AI priority and above (per entry: min_priority)."))
    worklist_url: str = Field("", description=(
        "Public base URL of the worklist page (e.g. https://triage.example.org/worklist), for links in messages."))


class WorklistOidcSettings(Section):
    issuer: str = ""
    client_id: str = ""
    scopes: str = "openid profile"


class WorklistSettings(Section):
    """The worklist page served by `triage api` at /worklist."""

    poll_interval_s: float = Field(5.0, description="How often the open page asks for changes.")
    max_rows: int = Field(500, description=(
        "At most this many studies are listed (highest priority and longest waiting first)."))
    max_age_days: float = Field(30, description=(
        "Studies whose last image arrived longer ago than this leave the list (0: never), so a site without "
        "report intake (which removes read studies) does not list every study it ever received."))
    hide_reported: bool = Field(True, description=(
        "Studies with a final report (HL7 ORU or POST /reports) leave the worklist."))
    viewer_url: str = Field("", description=(
        "Link to open a study in the viewer, with {study_uid} and {accession}; empty: no viewer link."))
    login: Literal["token", "oidc"] = Field("token", description=(
        "token: a bearer token (api.tokens) typed on the login page, kept in the tab's sessionStorage. oidc is "
        "reserved: the page's login module (static/worklist/auth.js) has its place and receives the settings "
        "below, but the sign-in flow and the API's validation of the provider's tokens are not built yet."))
    oidc: WorklistOidcSettings = Field(default_factory=WorklistOidcSettings)


class BootstrapSettings(Section):
    """TPR/FPR disparity bootstrap: units drawn per iteration from the group (and as many diagnosis-matched from
    the population), iterations, and the seed that makes a refresh reproducible."""

    sample_size: int = 200
    iterations: int = 20
    seed: int = 20240601


class FairnessSettings(Section):
    """Turnaround and fairness (train/fairness) and final-report intake (pacs_bridge/hl7_intake, POST /reports)."""

    long_turnaround_days: list[float] = Field(default_factory=lambda: [3, 7], description=(
        "A radiologist turnaround (examination to final report) longer than each of these is \"long\"; the report "
        "gives the odds of a long turnaround per group against its reference group, for each threshold."))
    min_group_size: int = Field(30, description=(
        "Groups with fewer studies than this are listed but not tested (odds ratios)."))
    min_group_units: int = Field(20, description=(
        "Groups with fewer units than this (positives for TPR, negatives for FPR) are not tested."))
    attributes: list[str] = Field(
        default_factory=lambda: ["sex", "age_band", "ethnic_group", "region", "density_quartile", "scheduling",
                                 "scanner_manufacturer", "scanner_model", "insurance_class"],
        description="Sensitive attributes analysed one by one.")
    intersections: list[list[str]] = Field(
        default_factory=lambda: [["sex", "age_band"], ["region", "scheduling"]],
        description="The pairs of attributes analysed as intersectional groups.")
    reference_groups: dict[str, str] = Field(default_factory=dict, description=(
        "attribute -> reference group for the odds ratios, e.g. {region: south}. Unset: the largest known group."))
    age_band_edges: list[int] = Field(default_factory=lambda: [18, 40, 65, 80], description=(
        "Lower edges of the age bands after the first, in years: 0-17, 18-39, 40-64, 65-79, 80+."))
    postcode_table: str = Field("", description=(
        "CSV postcode_prefix,region,density_quartile. Empty: the fictional example in pacs_bridge/data."))
    holidays: list[date] = Field(default_factory=list, description=(
        "Public holidays (YYYY-MM-DD): examinations on them are scheduled \"holiday\" rather than "
        "weekday/weekend."))
    timezone: str = Field("UTC", description=(
        "Time zone of HL7 and DICOM times written without an offset, and of the weekday/weekend calendar."))
    bootstrap: BootstrapSettings = Field(default_factory=BootstrapSettings, description=(
        "TPR/FPR disparity bootstrap: units drawn per iteration from the group (and as many diagnosis-matched "
        "from the population), iterations, and the seed that makes a refresh reproducible."))
    alpha: float = 0.05
    correction: Literal["holm", "bh"] = Field("holm", description=(
        "Multiple-testing correction within each family of tests: holm (family-wise), bh (false discovery rate)."))
    min_disparity: float = Field(0.05, description=(
        "A TPR/FPR disparity smaller than this is not flagged, however small its p-value."))
    refresh_interval_s: float = Field(3600, description=(
        "Seconds between scheduled refreshes (the beat's fairness-refresh entry, run by `triage train worker`; "
        "`triage fairness refresh` runs one at once); 0: no scheduled refresh."))
    metrics_port: int = Field(0, description=(
        "Port for Prometheus metrics of the scheduled refresh (served by `triage train worker`); 0: not served."))
    report_path: str = Field("", description=(
        "Where the scheduled refresh writes the HTML report. Empty: <var_dir>/fairness/report.html."))
    mllp_host: str = Field("127.0.0.1", description=(
        "HL7 v2 ORU^R01 final-report listener (MLLP). 2575 is the registered HL7 port."))
    mllp_port: int = 2575
    mllp_senders: Entries = Field(default_factory=list, description=(
        "Who may send final reports (a final ORU takes its study off the worklist and becomes training ground "
        "truth). Each: {application: MSH-3, facility: MSH-4 (optional), hosts: [IP or CIDR, ...] (optional)}. "
        "Connections from addresses no entry allows are closed unread; other messages are rejected (AR) and kept. "
        "Empty: any peer and any sender (a warning is logged at start)."))
    mllp_tls: TlsSettings = Field(default_factory=TlsSettings, description=(
        "TLS on the listener: PEM cert and key (no cert: plain TCP); ca + require_client_cert: senders must "
        "present a certificate signed by ca (mutual TLS)."))
    mllp_max_connections: int = Field(32, description=(
        "Connections open at once (more are closed as they arrive)."))
    mllp_idle_timeout_s: float = Field(600, description="Seconds a connection may be silent between messages.")
    mllp_message_timeout_s: float = Field(30, description=(
        "Seconds from a message's first byte to its end (and for the TLS handshake)."))
    mllp_application: str = Field("TRIAGE", description="MSH-3 of our acknowledgements.")
    mllp_facility: str = Field("", description="MSH-4 of our acknowledgements.")
    hl7_kept_dir: str = Field("", description="Kept rejected and failed HL7 messages. Empty: <var_dir>/hl7.")


class MaintenanceSettings(Section):
    """Periodic jobs besides the nightly retraining (training.nightly_cron) and the fairness refresh
    (fairness.refresh_interval_s): all are entries of the one Celery beat schedule (worker/celery_app.py; run
    exactly one `celery -A worker.tasks beat` per deployment)."""

    index_cron: str = Field("0 4 * * *", description=(
        "Rebuild of the slice-evidence vector index from its table (compaction after deletions, the index kind "
        "chosen anew by size), crontab fields as training.nightly_cron. Empty: not scheduled."))
    reconcile_cron: str = Field("30 4 * * *", description=(
        "A pass over the whole store from a CPU worker (task triage.reconcile_store), besides the receiver's own "
        "passes over the folders changed since its last (store.reconcile_interval_s). Empty: not scheduled."))


class GateSettings(Section):
    """Promotion gates: the candidate against the serving model on the same held-out studies."""

    max_mean_auroc_drop: float = 0.0
    max_label_auroc_drop: float = 0.05
    max_calibration_increase: float = 0.02
    max_disparity_increase: float = 0.05
    min_group_units: int = Field(5, description=(
        "Groups with fewer (study, diagnosis) units than this are left out of the disparity gate."))
    min_held_out: int = 10


class TrainingSettings(Section):
    """Training and nightly retraining (train/nightly.py, `triage train nightly|worker|beat`, `triage models ...`)."""

    nightly_cron: str = Field("30 1 * * *", description=(
        "Celery beat schedule of the nightly job (crontab fields: minute hour day-of-month month day-of-week); it "
        "runs on the \"training\" queue, served by `triage train worker`."))
    models_dir: str = Field("", description=(
        "Candidate bundles are written here (shared storage the workers can read). Empty: <var_dir>/models."))
    work_dir: str = Field("", description="Checkpoints of running jobs. Empty: <var_dir>/training.")
    seed: int = 0
    held_out_fraction: float = Field(0.25, description=(
        "Share of labelled studies held out for evaluation (by a hash of the Study Instance UID: the same studies "
        "every night, never trained on)."))
    validation_fraction: float = Field(0.2, description="Share of the rest that chooses the thresholds.")
    min_new_studies: int = Field(1, description=(
        "A night with fewer newly labelled studies than this does not retrain."))
    min_training_studies: int = Field(10, description="Fewer training studies than this: no run.")
    heads_steps: int = 300
    heads_learning_rate: float = 0.003
    triage_table: str = Field("", description=(
        "The diagnosis -> priority -> referral table (CSV). Empty: train/data/diagnosis_triage.csv."))
    gates: GateSettings = Field(default_factory=GateSettings, description=(
        "Promotion gates: the candidate against the serving model on the same held-out studies."))


def _resolved(path: Path) -> Path:
    return path.resolve()


class Settings(BaseSettings):
    """The whole configuration, one typed section per top-level key, with a few derived paths."""

    model_config = SettingsConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                                      nested_model_default_partial_update=True)

    var_dir: Annotated[Path, AfterValidator(_resolved)] = Field(Path("var"), description=(
        "Folder for received images (incoming/), rejected input (quarantine/), SRs (outbox/), the embedded broker "
        "(broker/) and the SQLite database. Relative paths are taken from the working directory."))
    database: DatabaseSettings = Field(DatabaseSettings())
    broker: BrokerSettings = Field(BrokerSettings())
    scp: ScpSettings = Field(ScpSettings(), description="The DICOM receiver (pacs_bridge/scp.py).")
    store: StoreSettings = Field(StoreSettings())
    assembly: AssemblySettings = Field(AssemblySettings(), description="When a study is complete.")
    routing: RoutingSettings = Field(RoutingSettings(), description=(
        "Routing (pacs_bridge/rules.py has the full grammar). Loop prevention always applies first: SRs, key "
        "objects, presentation states and other derived objects are never processed nor forwarded. Then the "
        "rules, in order; the first whose `match` holds decides; else the fallback. `triage rules test FILE...` "
        "shows what files would match."))
    pull: PullSettings = Field(PullSettings(), description=(
        "Retrieving studies already in a PACS: `triage pull --study UID` and `triage backfill --from --to`. Pulled "
        "studies are received like any other (C-MOVE sends them to our SCP; C-GET and WADO-RS results are stored "
        "by the command itself) and go through the same completion and routing, in `triage serve`."))
    model: ModelSettings = Field(ModelSettings(), description="The Prima model of the neuro_mri pipeline.")
    input_gate: InputGateSettings = Field(InputGateSettings(), description=(
        "The input adequacy gate (worker/input_gate.py), checked from the image headers before the model runs. A "
        "study that fails it is \"not analysed\": run status not_analysed, study status \"not analysed\", an event "
        "of kind not_analysed with the reasons, the metric triage_runs_total{outcome=\"not_analysed\"}, no "
        "priority raised, no forward after processing, and (write_sr) an SR that says it was not analysed and "
        "why. How long a study waits for its series: it is judged when it is complete (assembly: all of the "
        "routing rule's expected_series present and nothing arrived for expected_series_settle_s; else "
        "quiet_period_s of silence with no association sending; at the latest max_wait_s after its first image). "
        "A series that arrives after that re-opens the study, and the new version is judged again (and analysed, "
        "once adequate). Per pipeline (neuro_mri, slice_knn): the policy's keys."))
    explain: ExplainSettings = Field(ExplainSettings())
    slice_evidence: SliceEvidenceSettings = Field(SliceEvidenceSettings(), description=(
        "Slice evidence (worker/slice_evidence.py): each processed study's slices are embedded with "
        "MedImageInsight, the k most similar prior studies in the index (with their confirmed findings: labels of "
        "their final reports) go into the result and the SR, and the study joins the index. The slice_knn "
        "pipeline (studies Prima does not cover: CR, DX, CT) reports kNN findings from the same neighbours. "
        "Evidence never fails a neuro_mri run."))
    zero_shot: ZeroShotSettings = Field(ZeroShotSettings(), description=(
        "Zero-shot findings from text prompts (worker/zero_shot.py): a prompt table per pipeline (a file, or a "
        "name in models/prompts), several prompts per finding averaged against a \"no finding\" prompt; text "
        "embeddings are cached under <var_dir>/text_embeddings per (weights sha256, table hash). slice_knn: where "
        "neighbours with a final report exist, a finding's score is knn_weight * kNN + (1 - knn_weight) * "
        "zero-shot."))
    destinations: Entries = Field(default_factory=list, description=(
        "Where SRs go. Each: {name, kind: dicom, host, port, ae_title, tls} or {name, kind: dicomweb, url}. "
        "Empty: SRs stay in <var_dir>/outbox only. results: false makes an entry a destination that routing rules "
        "forward images to (routing.rules[].forward) and that gets no SRs. tls (optional, DICOM TLS): {ca: PEM "
        "that signs the peer, cert/key: our client certificate if the peer wants one, server_name: the name in "
        "the peer's certificate if not its host}."))
    delivery: DeliverySettings = Field(DeliverySettings(), description=(
        "Retries of SR deliveries, forwards and worklist publications (Celery retries with a countdown, no loop "
        "of ours): the n-th retry waits min(backoff_s * 2**n, max_backoff_s); a delivery still failing "
        "retry_for_s after it was created (a publication: after it was first tried) is dead-lettered (`triage "
        "deliveries`, `triage publications`). The defaults ride out a PACS maintenance window of several hours "
        "with no manual step."))
    metrics: MetricsSettings = Field(MetricsSettings(), description=(
        "/metrics, /healthz and /readyz of `triage serve` and of each `triage worker` (0 = not served)."))
    api: ApiSettings = Field(ApiSettings(), description="The HTTP API (`triage api`).")
    worker: WorkerSettings = Field(WorkerSettings())
    publishers: Entries = Field(default_factory=list, description=(
        "Worklist publishers (pacs_bridge/publishers): where each study's AI priority is pushed. They only ever "
        "raise a priority, never lower one, and record the value they found and why (`triage publications`). "
        "Each entry: {name, kind: ups_rs, url: <DICOMweb base>, match: accession|study, create_if_missing: "
        "false}; {name, kind: hl7v2, host, port, message: ORM^O01|OMI^O23, version: \"2.5.1\", "
        "receiving_application, ...}; {name, kind: fhir, url: <FHIR base>, resource: ServiceRequest|Task, "
        "identifier_system, method: patch|put}; {name, kind: webhook, url, min_priority: stat, secret_env | "
        "secret_file}; and optionally levels/ranks (overriding the scales below), timeout_s, token_env | "
        "token_file (bearer)."))
    publishing: PublishingSettings = Field(PublishingSettings())
    worklist: WorklistSettings = Field(WorklistSettings(), description=(
        "The worklist page served by `triage api` at /worklist."))
    fairness: FairnessSettings = Field(FairnessSettings(), description=(
        "Turnaround and fairness (train/fairness) and final-report intake (pacs_bridge/hl7_intake, POST "
        "/reports)."))
    maintenance: MaintenanceSettings = Field(MaintenanceSettings(), description=(
        "Periodic jobs besides the nightly retraining (training.nightly_cron) and the fairness refresh "
        "(fairness.refresh_interval_s): all are entries of the one Celery beat schedule (worker/celery_app.py; "
        "run exactly one `celery -A worker.tasks beat` per deployment)."))
    training: TrainingSettings = Field(TrainingSettings(), description=(
        "Training and nightly retraining (train/nightly.py, `triage train nightly|worker|beat`, "
        "`triage models ...`)."))

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Settings() is the embedded defaults alone (tests build on them); load_settings chooses the sources.
        return (init_settings,)

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
        return self.database.url or f"sqlite:///{self.var_dir / 'triage.db'}"

    @property
    def broker_url(self) -> str:
        return self.broker.url or "filesystem://"

    @property
    def device_uid(self) -> str:
        """The configured device UID, or one derived from the deployment's var folder (stable per deployment)."""
        from pydicom.uid import generate_uid

        return self.worker.device_uid or generate_uid(entropy_srcs=["triage-device", str(self.var_dir)])


class ConfigurationError(ValueError):
    """The configuration does not validate; the message names each offending key, one per line."""


class UnknownConfigurationKey(ConfigurationError, KeyError):
    """A key the configuration does not have (a typo in the file or in a ``TRIAGE_*`` variable)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


class YamlFile(YamlConfigSettingsSource):
    """The configuration file; it must hold a mapping of sections."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        loaded = yaml.safe_load(Path(file_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"{file_path}: the configuration must be a mapping, not {type(loaded).__name__}")
        return loaded


def _field_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The model of section ``name`` of ``model`` (None: a plain value or free-form entries)."""
    annotation = model.model_fields[name].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _names_a_key(path: list[str]) -> bool:
    model: type[BaseModel] | None = Settings
    for part in path:
        if model is None or part not in model.model_fields:
            return False
        model = _field_model(model, part)
    return True


class TriageEnvironment(PydanticBaseSettingsSource):
    """``TRIAGE_<SECTION>__<KEY>`` variables, values parsed as YAML scalars; ``..._FILE``: the named file's content.

    Variables whose first part names no section (``TRIAGE_TEST_POSTGRES``) are not configuration and are left
    alone; a wrong key *inside* a known section (``TRIAGE_SCP__PROT``) is refused by validation like a typo in
    the file.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: dict[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole tree at once

    def __call__(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        for name, text in self.environ.items():
            if not name.startswith("TRIAGE_") or name == "TRIAGE_CONFIG":
                continue
            path = name[len("TRIAGE_"):].lower().split("__")
            if path[0] not in Settings.model_fields:
                continue
            if len(path) > 1 and path[-1].endswith("_file") and not _names_a_key(path):
                # TRIAGE_DATABASE__URL_FILE=/run/secrets/db: the value is the file's content (Docker and Kubernetes
                # secrets), so a password is neither in the configuration file nor in the process environment.
                # Keys that themselves end in _file (api.oidc.jwks_file) keep their own meaning.
                path[-1] = path[-1][: -len("_file")]
                value: Any = Path(text).read_text().strip()
            else:
                value = yaml.safe_load(text) if text != "" else ""
            node = overrides
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return overrides


def _where(location: tuple[int | str, ...]) -> str:
    # pydantic names a mapping's key "[key]" after the key itself (model.priority_map.hihg.[key]): drop it.
    parts = [part for part in location if part != "[key]"]
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")


def _configuration_error(error: ValidationError) -> ConfigurationError:
    """One line per offending key: ``scp.port: Input should be a valid integer, ... (got 'abc')``."""
    lines, unknown = [], False
    for problem in error.errors():
        where = _where(problem["loc"])
        if problem["type"] == "extra_forbidden":
            unknown = True
            parent, key = problem["loc"][:-1], problem["loc"][-1]
            model: type[BaseModel] | None = Settings
            for part in parent:
                model = _field_model(model, str(part)) if model is not None and part in model.model_fields else None
            known = f"; known keys: {sorted(model.model_fields)}" if model is not None else ""
            lines.append(f"{where}: unknown configuration key {key!r}{known}")
        else:
            lines.append(f"{where}: {problem['msg']} (got {problem['input']!r})")
    return (UnknownConfigurationKey if unknown else ConfigurationError)("\n".join(lines))


def load_settings(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults, then the YAML file (if any), then ``TRIAGE_*`` environment variables, validated together."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("TRIAGE_CONFIG") or ("triage.yaml" if Path("triage.yaml").exists() else None)
    # Earlier sources win. The defaults take part as a source so that a file or variable setting one key of a
    # mapping (model.priority_map.high, publishing.scales.hl7v2.levels) keeps the other keys' defaults.
    sources: list[PydanticBaseSettingsSource] = [InitSettingsSource(Settings, {}), TriageEnvironment(Settings, environ)]
    if path:
        sources.append(YamlFile(Settings, yaml_file=Path(path)))
    sources.append(DefaultSettingsSource(Settings, nested_model_default_partial_update=True))
    try:
        return Settings(_build_sources=(tuple(sources), {}))
    except ValidationError as error:
        raise _configuration_error(error) from None
