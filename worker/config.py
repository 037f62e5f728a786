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
        # How often `triage serve` asks the workers which queues they consume (one broadcast, 1 s timeout); a routed
        # pipeline's queue (or the delivery queue) that no worker consumes raises triage_queue_without_consumer and,
        # while messages wait in it, a `queue_without_consumer` event.
        "consumer_check_interval_s": 60,
    },
    "scp": {
        # pynetdicom: the C-STORE SCP in this process (TLS, per-image refusals with A700/A900/C000; ~150 images/s
        # per association). dcmtk: dcmtk's storescp on the wire, one process per association, with the same AE
        # checks and back-pressure applied when associations are requested, and objects that fail our checks
        # quarantined after storescp answered them (4x the images per second on one association here; no TLS).
        # See RUNBOOK.md.
        "engine": "pynetdicom",
        "ae_title": "TRIAGE",
        "host": "127.0.0.1",
        "port": 11112,
        # Calling AE titles allowed to associate. Empty list: any calling AE title is accepted.
        "allowed_calling_aets": [],
        "max_pdu": 131072,
        "max_associations": 10,
        # Seconds without any PDU after which an idle association is aborted; also the most a peer may stay silent
        # while connecting, negotiating TLS or sending one PDU (slow senders are cut off, not waited for).
        "network_timeout_s": 60,
        # Seconds a new connection may take to send its A-ASSOCIATE-RQ (TLS handshake included) before it is closed
        # (pynetdicom engine). max_associations counts negotiated associations only, so silent connections cannot
        # hold the slots; this bounds how long each one lasts.
        "association_request_timeout_s": 5,
        # Calling AE title -> the IP addresses or CIDR networks it may connect from, e.g. {PACS: [10.1.2.3],
        # MR1: [10.20.0.0/24]}. A title listed here is allowed (as if in allowed_calling_aets) but only from these
        # addresses; titles not listed are governed by allowed_calling_aets alone.
        "ae_hosts": {},
        # Objects larger than this many bytes are refused with 0xA700 (Out of Resources); 0: no limit.
        "max_object_bytes": 2147483648,
        # Back-pressure: while the database is this many instances behind, or the store's disk has less free
        # than min_free_bytes, C-STOREs are answered Out of Resources (A700) so senders keep and retry them.
        "max_backlog": 20000,
        "min_free_bytes": 1073741824,
        # Back-pressure as well while the database has taken no write for this many seconds (down, locked, full).
        "max_write_stall_s": 5.0,
        # DICOM TLS (PS3.15 B.1) on the listener. PEM paths; no cert: plain TCP. require_client_cert: senders must
        # present a certificate signed by ca (mutual TLS).
        "tls": {"cert": "", "key": "", "ca": "", "require_client_cert": True},
    },
    "store": {
        # fsync each received file and its folder before the sender is told Success (a power cut loses nothing that
        # was acknowledged; about 0.6 ms an image here). false only for throw-away stores.
        "fsync": True,
        # The store is the truth: at start-up and then every reconcile_interval_s seconds, files in
        # <var_dir>/incoming without a database row (the process died between the two) are recorded through the
        # same checks, or quarantined. Files younger than reconcile_grace_s are left to the bookkeeper writing them.
        "reconcile_interval_s": 300,
        "reconcile_grace_s": 120,
    },
    "assembly": {
        # A study is complete when no instance has arrived for this many seconds and no association is still
        # sending it...
        "quiet_period_s": 10.0,
        # ... or, whatever else, this many seconds after its first instance arrived.
        "max_wait_s": 900.0,
        # How often the completion check runs.
        "poll_interval_s": 1.0,
        # When a routing rule's expected series are all present, the study is complete once nothing has arrived for
        # this long and no association is sending it (so the last series is not cut), without the quiet period.
        "expected_series_settle_s": 2.0,
    },
    # Routing (pacs_bridge/rules.py has the full grammar). Loop prevention always applies first: SRs, key objects,
    # presentation states and other derived objects are never processed nor forwarded. Then the rules, in order; the
    # first whose `match` holds decides; else the fallback. `triage rules test FILE...` shows what files would match.
    "routing": {
        # Each rule: {name, match, pipeline, lane, quiet_period_s, max_wait_s, expected_series, forward}.
        #   match: a condition. {all: [...]}, {any: [...]}, {not: ...}, or {tag: NAME, OP: VALUE} where NAME is a DICOM
        #     keyword (Modality, BodyPartExamined, StudyDescription, SeriesDescription, Manufacturer, ...) or
        #     calling_aet | called_aet | peer_address | source (c-store, stow-rs, c-get, wado-rs), and OP is
        #     equals (a value or a list), regex (Python re.search), range ([low, high], null = open; ages in years)
        #     or present (true/false). A test holds when any image series' value passes it.
        #   pipeline: neuro_mri | slice_knn | ignore.   lane: urgent | routine (urgent runs are taken first).
        #   quiet_period_s, max_wait_s: this study's completion timings (default: the assembly section's).
        #   expected_series: SeriesDescription regexes; the study is complete as soon as each matches a series.
        #   forward: [{to: [DESTINATION, ...], stage: before | after, if: CONDITION}], sending the study's images
        #     as received to destinations named under `destinations`: before = on routing; after = once processed,
        #     if the AI result satisfies `if` ({result: priority | findings | reported | referrals | model_name |
        #     model_version | probability:LABEL, OP: VALUE}; e.g. {result: priority, equals: stat}, or
        #     {not: {result: findings, present: true}} for "no finding").
        "rules": [
            {"name": "mr-to-neuro", "match": {"tag": "Modality", "equals": "MR"}, "pipeline": "neuro_mri",
             "lane": "routine"},
        ],
        # Applies when no rule matches: the same keys as a rule, without `match`.
        "fallback": {"name": "fallback", "pipeline": "ignore", "lane": "routine", "quiet_period_s": None,
                     "max_wait_s": None, "expected_series": [], "forward": []},
    },
    # Retrieving studies already in a PACS: `triage pull --study UID` and `triage backfill --from --to`. Pulled
    # studies are received like any other (C-MOVE sends them to our SCP; C-GET and WADO-RS results are stored by
    # the command itself) and go through the same completion and routing, in `triage serve`.
    "pull": {
        # Where to pull from. Each: {name, kind: dicom, host, port, ae_title, tls} (C-FIND, C-MOVE, C-GET) or
        # {name, kind: dicomweb, url} (QIDO-RS, WADO-RS). The first of the right kind is used unless --source names one.
        "sources": [],
        # Our AE title towards the PACS. Empty: scp.ae_title.
        "calling_aet": "",
        # The C-MOVE destination: the AE title under which the PACS knows our SCP. Empty: scp.ae_title.
        "move_destination": "",
        # Seconds between two studies of a backfill, so the PACS keeps serving its users.
        "pause_s": 2.0,
        # A backfill queries the PACS this many days at a time (PACSs cap the answers to one query).
        "query_window_days": 7,
        # Seconds one study's retrieval may take (a C-MOVE, C-GET or WADO-RS request) before it is given up.
        "timeout_s": 600,
    },
    "model": {
        # Path to a model bundle folder (manifest.json + weights). Required for processing; never downloaded.
        "bundle": "",
        # "auto" uses CUDA when available, else the CPU.
        "device": "auto",
        # Threads of one worker process's model pass on the CPU (0: torch's default, one per core). With several
        # worker processes on one host, give each cores / processes: more threads than cores in all make the
        # model pass many times slower (they wait on each other), not faster.
        "cpu_threads": 0,
        # The study description the Prima study encoder is conditioned on.
        "study_description": "MRI BRAIN WO AND W CONTRAST",
        # How many diagnoses the SR reports: those above threshold, topped up to this many by probability.
        "report_top_k": 5,
        # Prima priority classes -> worklist priority (a clinical configuration).
        "priority_map": {"none": "routine", "low": "urgent", "medium": "urgent", "high": "stat"},
        # Referral heads whose probability reaches this value are reported.
        "referral_threshold": 0.5,
        # Diagnosis labels the site has the model rule out: below their threshold they are reported (in the SR) as
        # explicitly Absent, beside the called (Present) findings and the rest of the differential (Undetermined).
        "report_absent": [],
    },
    # The input adequacy gate (worker/input_gate.py), checked from the image headers before the model runs. A study
    # that fails it is "not analysed": run status not_analysed, study status "not analysed", an event of kind
    # not_analysed with the reasons, the metric triage_runs_total{outcome="not_analysed"}, no priority raised, no
    # forward after processing, and (write_sr) an SR that says it was not analysed and why.
    # How long a study waits for its series: it is judged when it is complete (assembly: all of the routing rule's
    # expected_series present and nothing arrived for expected_series_settle_s; else quiet_period_s of silence with
    # no association sending; at the latest max_wait_s after its first image). A series that arrives after that
    # re-opens the study, and the new version is judged again (and analysed, once adequate).
    "input_gate": {
        "enabled": True,
        # Write an SR for a study that is not analysed (to the same destinations as results). false: none.
        "write_sr": True,
        # Per pipeline: modalities (series of other modalities do not count); body_part_regex (Python re.search on
        # BodyPartExamined; empty: any); accept_missing_body_part (series without BodyPartExamined count, as many
        # scanners leave it empty); required_series (SeriesDescription patterns, each must match a series that
        # counts; null: the routing rule's expected_series, with the same matching as completion; []: none);
        # min_slices (distinct slice positions) and min_coverage_mm (along the slice normal, first to last slice
        # plus one slice thickness) that a series needs to count; at least one series must count.
        "neuro_mri": {
            "modalities": ["MR"],
            "body_part_regex": r"(?i)^(brain|head|skull|cerebrum|neuro|headneck|head_neck)$",
            "accept_missing_body_part": True,
            "required_series": None,
            # The study encoder tokenises 4-slice blocks over the brain (about 140 mm head to foot).
            "min_slices": 12,
            "min_coverage_mm": 80.0,
        },
        "slice_knn": {
            "modalities": ["CT", "CR", "DX", "MR"],
            "body_part_regex": "",
            "accept_missing_body_part": True,
            "required_series": None,
            # CR/DX images have no slice geometry: their coverage counts as 0 mm.
            "min_slices": 1,
            "min_coverage_mm": 0.0,
        },
    },
    "explain": {
        # LIME over the volume tokens of the series that carries each positive finding; the top tokens become
        # image regions in the SR. Each sample is one forward pass of the series and study ViTs.
        "enabled": True,
        "samples": 64,
        "top_tokens": 3,
        "max_findings": 2,
    },
    # Slice evidence (worker/slice_evidence.py): each processed study's slices are embedded with MedImageInsight, the
    # k most similar prior studies in the index (with their confirmed findings: labels of their final reports) go
    # into the result and the SR, and the study joins the index. The slice_knn pipeline (studies Prima does not
    # cover: CR, DX, CT) reports kNN findings from the same neighbours. Evidence never fails a neuro_mri run.
    "slice_evidence": {
        "enabled": True,
        # The official weights file (medimageinsigt-v1.0.0.pt, a safetensors file). Empty: no evidence, except with
        # config tiny (a seeded random model, for the demo and tests). Never downloaded.
        "weights": "",
        # full (the published network) | tiny (same structure, small widths)
        "config": "full",
        "device": "auto",
        # auto: bf16 on a GPU, fp32 on a CPU | fp32 | bf16
        "precision": "auto",
        "batch_size": 16,
        # An evenly spaced subset of each series' slices, and at most this many series (the largest) per study.
        "max_slices_per_series": 8,
        "max_series": 8,
        # The faiss index file (a cache of the slice_embeddings table). Empty: <var_dir>/index/slices.faiss. The index
        # is partitioned by the study's modality and body region (one file each, slices.MR-HEAD.faiss, ...): a study
        # is compared only with studies of its own partition, so brain MRs never list CT heads as similar.
        "index_path": "",
        # The site key of the pseudonymous references by which an SR names similar prior studies (never by their
        # UIDs: they are other patients' studies); the worklist resolves them for authorised users. Empty: a random
        # key made once at <var_dir>/keys/study-reference.key. Workers on several hosts must share one key file.
        "reference_key_file": "",
        # Exact search up to exact_max studies; beyond it ivf (nprobe lists searched) or hnsw.
        "exact_max": 200000,
        "approximate": "ivf",
        "nprobe": 32,
        # Neighbours that vote in kNN classification (the paper's k), and similar prior studies reported.
        "k": 20,
        "evidence_k": 5,
        # Prior studies less similar than this are not reported as evidence.
        "min_similarity": 0.0,
        # slice_knn: a label is a finding from this kNN score on (scores are similarity-weighted vote fractions).
        "finding_threshold": 0.5,
        # slice_knn: finding label -> worklist priority (routine | urgent | stat); the highest positive one wins.
        "priority_of_findings": {},
    },
    # Zero-shot findings from text prompts (worker/zero_shot.py): a prompt table per pipeline (a file, or a name in
    # models/prompts), several prompts per finding averaged against a "no finding" prompt; text embeddings are
    # cached under <var_dir>/text_embeddings per (weights sha256, table hash). slice_knn: where neighbours with a
    # final report exist, a finding's score is knn_weight * kNN + (1 - knn_weight) * zero-shot.
    "zero_shot": {
        "enabled": True,
        "slice_prompts": "slice_findings",
        "prima_prompts": "prima_diagnoses",
        "knn_weight": 0.5,
        # A zero-shot score from this on makes the finding positive.
        "threshold": 0.5,
    },
    # Where SRs go. Each: {name, kind: dicom, host, port, ae_title, tls} or {name, kind: dicomweb, url}. Empty: SRs
    # stay in <var_dir>/outbox only. results: false makes an entry a destination that routing rules forward images to
    # (routing.rules[].forward) and that gets no SRs.
    # tls (optional, DICOM TLS): {ca: PEM that signs the peer, cert/key: our client certificate if the peer wants
    # one, server_name: the name in the peer's certificate if not its host}.
    "destinations": [],
    # Retries of SR deliveries, forwards and worklist publications (Celery retries with a countdown, no loop of
    # ours): the n-th retry waits min(backoff_s * 2**n, max_backoff_s); a delivery still failing retry_for_s after
    # it was created (a publication: after it was first tried) is dead-lettered (`triage deliveries`, `triage
    # publications`). The defaults ride out a PACS maintenance window of several hours with no manual step.
    "delivery": {
        # Also give up after this many attempts (0: no limit but retry_for_s).
        "attempts": 0,
        "backoff_s": 10.0,
        "max_backoff_s": 600.0,
        "retry_for_s": 28800.0,
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
        # Bearer tokens: each {token_file | token_env, name, role}. Roles: radiologist (read), sender (store images
        # by STOW-RS: POST /dicom-web/studies), admin (everything).
        # Tokens are read from files or the environment, never written in this file.
        "tokens": [],
        # Signing in on the worklist also opens a browser session (an HttpOnly, SameSite=Strict cookie signed with
        # the token) for the pages a browser navigates to, such as /fairness; it ends after this many seconds.
        "session_max_age_s": 43200,
        # HTTPS: PEM certificate and key (no cert: plain HTTP, for loopback only). ca + require_client_cert: clients
        # must also present a certificate signed by ca.
        "tls": {"cert": "", "key": "", "ca": "", "require_client_cert": False},
        # Tokens live in the database (hashes), shared by every API replica; a replica caches an accepted token this
        # many seconds, so a revoked one (POST /admin/tokens/reload on any replica) is refused everywhere after it.
        "token_cache_s": 2.0,
        # OpenID Connect bearer tokens (JWTs) from the hospital's identity provider, beside the static tokens:
        # issuer and audience must match, keys from jwks_url (or jwks_file), the role from role_claim (a dotted
        # path, e.g. realm_access.roles) through role_map ({provider role: radiologist|sender|admin}). No issuer:
        # off.
        "oidc": {"issuer": "", "audience": "", "jwks_url": "", "jwks_file": "", "algorithms": ["RS256", "ES256"],
                 "role_claim": "roles", "role_map": {}, "name_claim": "preferred_username", "leeway_s": 30,
                 "jwks_cache_s": 300},
        # Request limits. A body larger than this is refused (413) while it streams in; STOW-RS is limited per
        # instance by scp.max_object_bytes instead. A request whose headers take longer than header_timeout_s, or
        # whose body pauses longer than body_timeout_s, is cut off; at most max_connections are served at once
        # (503 beyond). Idle keep-alive connections close after keep_alive_s.
        "max_body_bytes": 8388608,
        "header_timeout_s": 10.0,
        "body_timeout_s": 30.0,
        "max_connections": 200,
        "keep_alive_s": 5,
    },
    "worker": {
        # A stable identifier of this deployment's device, written as the SR's Device Observer UID.
        "device_uid": "",
        "name": "triage-worker",
        "institution_name": "",
        # Hard time limit for one study's processing; the soft limit is 90 % of it.
        "task_time_limit_s": 1800,
        "max_attempts": 3,
        # A run queued this long without a worker starting it, or a delivery pending this long, is handed to the
        # broker again (its message may have been lost, e.g. Redis restarted without persistence).
        "redispatch_after_s": 900,
        # Micro-batching: a worker runs up to this many ready studies through the model together, waiting at
        # most batch_wait_s for companions of the study it was handed (1 = no batching).
        "batch_size": 4,
        "batch_wait_s": 0.1,
        # Studies are loaded (DICOM read, decode, resample) in a pool of this many processes per worker process
        # (0: as many as the machine has cores; 1 and more: that many; -1: in the worker process itself). While
        # a batch is in the model, the next ready studies are claimed and loaded (prefetch_batches: how many
        # batches one task may take in a row before it hands back to the queue; 1 = no prefetch).
        "load_processes": 0,
        "prefetch_batches": 8,
        # Urgent-lane runs are taken first; a routine run that has waited this long is taken as if urgent.
        "starvation_after_s": 600,
    },
    # Worklist publishers (pacs_bridge/publishers): where each study's AI priority is pushed. They only ever raise a
    # priority, never lower one, and record the value they found and why (`triage publications`). Each entry:
    #   {name, kind: ups_rs, url: <DICOMweb base>, match: accession|study, create_if_missing: false}
    #   {name, kind: hl7v2, host, port, message: ORM^O01|OMI^O23, version: "2.5.1", receiving_application, ...}
    #   {name, kind: fhir, url: <FHIR base>, resource: ServiceRequest|Task, identifier_system, method: patch|put}
    #   {name, kind: webhook, url, min_priority: stat, secret_env | secret_file}
    # and optionally levels/ranks (overriding the scales below), timeout_s, token_env | token_file (bearer).
    "publishers": [],
    "publishing": {
        # AI priority (routine/urgent/stat) -> each system's value, and the rank of every value a system may hold
        # (a clinician's value the scale does not rank counts as possibly higher). A clinical configuration.
        "scales": {
            "ups_rs": {"levels": {"routine": "LOW", "urgent": "MEDIUM", "stat": "HIGH"},
                       "ranks": {"LOW": 0, "MEDIUM": 1, "HIGH": 2}},
            "hl7v2": {"levels": {"routine": "R", "urgent": "A", "stat": "S"},
                      "ranks": {"PRN": 0, "R": 0, "P": 1, "C": 1, "T": 2, "A": 2, "S": 3}},
            "fhir": {"levels": {"routine": "routine", "urgent": "urgent", "stat": "stat"},
                     "ranks": {"routine": 0, "urgent": 1, "asap": 2, "stat": 3}},
        },
        # When the current priority cannot be read (HL7 v2 with nothing recorded yet): top_only sends only the
        # highest value (which cannot lower anything), always sends, never skips.
        "when_current_unknown": "top_only",
        # Seconds per request: publishing runs inside the study's processing task.
        "timeout_s": 5.0,
        # Webhooks notify at this AI priority and above (per entry: min_priority).
        "webhook_min_priority": "stat",
        # Public base URL of the worklist page (e.g. https://triage.example.org/worklist), for links in messages.
        "worklist_url": "",
    },
    # The worklist page served by `triage api` at /worklist.
    "worklist": {
        # How often the open page asks for changes.
        "poll_interval_s": 5.0,
        # At most this many studies are listed (highest priority and longest waiting first).
        "max_rows": 500,
        # Studies whose last image arrived longer ago than this leave the list (0: never), so a site without
        # report intake (which removes read studies) does not list every study it ever received.
        "max_age_days": 30,
        # Studies with a final report (HL7 ORU or POST /reports) leave the worklist.
        "hide_reported": True,
        # Link to open a study in the viewer, with {study_uid} and {accession}; empty: no viewer link.
        "viewer_url": "",
        # token: a bearer token (api.tokens) typed on the login page, kept in the tab's sessionStorage. oidc is
        # reserved: the page's login module (static/worklist/auth.js) has its place and receives the settings
        # below, but the sign-in flow and the API's validation of the provider's tokens are not built yet.
        "login": "token",
        "oidc": {"issuer": "", "client_id": "", "scopes": "openid profile"},
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
        # Seconds between scheduled refreshes (the beat's fairness-refresh entry, run by `triage train worker`;
        # `triage fairness refresh --every` loops on its own); 0: no scheduled refresh.
        "refresh_interval_s": 3600,
        # Port for Prometheus metrics of the scheduled refresh (served by `triage train worker`); 0: not served.
        "metrics_port": 0,
        # Where the scheduled refresh writes the HTML report. Empty: <var_dir>/fairness/report.html.
        "report_path": "",
        # HL7 v2 ORU^R01 final-report listener (MLLP). 2575 is the registered HL7 port.
        "mllp_host": "127.0.0.1",
        "mllp_port": 2575,
        # Who may send final reports (a final ORU takes its study off the worklist and becomes training ground
        # truth). Each: {application: MSH-3, facility: MSH-4 (optional), hosts: [IP or CIDR, ...] (optional)}.
        # Connections from addresses no entry allows are closed unread; other messages are rejected (AR) and kept.
        # Empty: any peer and any sender (a warning is logged at start).
        "mllp_senders": [],
        # TLS on the listener: PEM cert and key (no cert: plain TCP); ca + require_client_cert: senders must present
        # a certificate signed by ca (mutual TLS).
        "mllp_tls": {"cert": "", "key": "", "ca": "", "require_client_cert": False},
        # Connections open at once (more are closed as they arrive); seconds a connection may be silent between
        # messages; seconds from a message's first byte to its end (and for the TLS handshake).
        "mllp_max_connections": 32,
        "mllp_idle_timeout_s": 600,
        "mllp_message_timeout_s": 30,
        # MSH-3/MSH-4 of our acknowledgements.
        "mllp_application": "TRIAGE",
        "mllp_facility": "",
        # Kept rejected and failed HL7 messages. Empty: <var_dir>/hl7.
        "hl7_kept_dir": "",
    },
    # Periodic jobs besides the nightly retraining (training.nightly_cron) and the fairness refresh
    # (fairness.refresh_interval_s): all are entries of the one Celery beat schedule (worker/celery_app.py; run
    # exactly one `celery -A worker.tasks beat` per deployment).
    "maintenance": {
        # Rebuild of the slice-evidence vector index from its table (compaction after deletions, the index kind
        # chosen anew by size), crontab fields as training.nightly_cron. Empty: not scheduled.
        "index_cron": "0 4 * * *",
        # A pass over the whole store from a CPU worker (task triage.reconcile_store), besides the receiver's own
        # passes over the folders changed since its last (store.reconcile_interval_s). Empty: not scheduled.
        "reconcile_cron": "30 4 * * *",
    },
    # Training and nightly retraining (train/nightly.py, `triage train nightly|worker|beat`, `triage models ...`).
    "training": {
        # Celery beat schedule of the nightly job (crontab fields: minute hour day-of-month month day-of-week); it
        # runs on the "training" queue, served by `triage train worker`.
        "nightly_cron": "30 1 * * *",
        # Candidate bundles are written here (shared storage the workers can read). Empty: <var_dir>/models.
        "models_dir": "",
        # Checkpoints of running jobs. Empty: <var_dir>/training.
        "work_dir": "",
        "seed": 0,
        # Share of labelled studies held out for evaluation (by a hash of the Study Instance UID: the same studies
        # every night, never trained on), and share of the rest that chooses the thresholds.
        "held_out_fraction": 0.25,
        "validation_fraction": 0.2,
        # A night with fewer newly labelled studies than this does not retrain; fewer training studies: no run.
        "min_new_studies": 1,
        "min_training_studies": 10,
        "heads_steps": 300,
        "heads_learning_rate": 0.003,
        # The diagnosis -> priority -> referral table (CSV). Empty: train/data/diagnosis_triage.csv.
        "triage_table": "",
        # Promotion gates: the candidate against the serving model on the same held-out studies.
        "gates": {
            "max_mean_auroc_drop": 0.0,
            "max_label_auroc_drop": 0.05,
            "max_calibration_increase": 0.02,
            "max_disparity_increase": 0.05,
            # Groups with fewer (study, diagnosis) units than this are left out of the disparity gate.
            "min_group_units": 5,
            "min_held_out": 10,
        },
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
        if path[0] not in DEFAULTS:
            # Not a configuration variable (e.g. a test's TRIAGE_TEST_POSTGRES); a wrong key *inside* a known
            # section (TRIAGE_SCP__PROT) is still refused by _merge.
            continue
        if path[-1].endswith("_file") and len(path) > 1:
            # TRIAGE_DATABASE__URL_FILE=/run/secrets/db: the value is the file's content (Docker and Kubernetes
            # secrets), so a password is neither in the configuration file nor in the process environment.
            path[-1] = path[-1][: -len("_file")]
            node = overrides
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = Path(text).read_text().strip()
            continue
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
