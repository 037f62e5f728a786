"""The receiver's settings: the ``scp`` section of the configuration, with its defaults and documentation.

A module of its own, importing neither pynetdicom nor the database, so that reading the configuration
(``worker.config`` composes this model) stays light for commands that never receive images.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pacs_bridge.dicom_tls import TlsFiles


class ScpSettings(BaseModel):
    """The ``scp`` section of the configuration: the DICOM receiver. Defaults and documentation live here only;
    ``worker.config.Settings`` composes this model as its ``scp`` section."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    engine: Literal["pynetdicom", "dcmtk"] = Field("pynetdicom", description=(
        "pynetdicom: the C-STORE SCP in this process (TLS, per-image refusals with A700/A900/C000; ~150 images/s "
        "per association). dcmtk: dcmtk's storescp on the wire, one process per association, with the same AE "
        "checks and back-pressure applied when associations are requested, and objects that fail our checks "
        "quarantined after storescp answered them (4x the images per second on one association here; no TLS). "
        "See RUNBOOK.md."))
    ae_title: str = Field("TRIAGE", description="Our AE title (the called AE title senders use).")
    host: str = Field("127.0.0.1", description="Address the receiver listens on.")
    port: int = Field(11112, description="TCP port the receiver listens on (0: any free port).")
    allowed_calling_aets: list[str] = Field(default_factory=list, description=(
        "Calling AE titles allowed to associate. Empty list: any calling AE title is accepted."))
    max_pdu: int = Field(131072, description="Largest PDU we receive, in bytes (0: unlimited).")
    max_associations: int = Field(10, description=(
        "Negotiated associations served at once; connections that have not asked for an association yet do not "
        "count."))
    network_timeout_s: float = Field(60.0, description=(
        "Seconds without any PDU after which an idle association is aborted; also the most a peer may stay silent "
        "while connecting, negotiating TLS or sending one PDU (slow senders are cut off, not waited for)."))
    association_request_timeout_s: float = Field(5.0, description=(
        "Seconds a new connection may take to send its A-ASSOCIATE-RQ (TLS handshake included) before it is closed "
        "(pynetdicom engine). max_associations counts negotiated associations only, so silent connections cannot "
        "hold the slots; this bounds how long each one lasts."))
    ae_hosts: dict[str, list[str]] = Field(default_factory=dict, description=(
        "Calling AE title -> the IP addresses or CIDR networks it may connect from, e.g. {PACS: [10.1.2.3], "
        "MR1: [10.20.0.0/24]}. A title listed here is allowed (as if in allowed_calling_aets) but only from these "
        "addresses; titles not listed are governed by allowed_calling_aets alone."))
    max_object_bytes: int = Field(2 * 1024**3, ge=0, description=(
        "Objects larger than this many bytes are refused with 0xA700 (Out of Resources); 0: no limit."))
    max_backlog: int = Field(20000, description=(
        "Back-pressure: while the database is this many instances behind, or the store's disk has less free than "
        "min_free_bytes, C-STOREs are answered Out of Resources (A700) so senders keep and retry them, rather than "
        "being accepted into a backlog that cannot be recorded or a disk that cannot hold them."))
    min_free_bytes: int = Field(1 << 30, description="See max_backlog.")
    max_write_stall_s: float = Field(5.0, description=(
        "Back-pressure as well while the database has taken no write for this many seconds (down, locked, full): "
        "the files would be safe, but nothing would complete until it returns, and the senders can hold them."))
    tls: TlsFiles | None = Field(None, description=(
        "DICOM TLS (PS3.15 B.1) on the listener: {cert, key, ca, require_client_cert} (PEM paths). No cert: plain "
        "TCP. require_client_cert (default true): senders must present a certificate signed by ca (mutual TLS)."))

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_from_config(cls, value: object) -> TlsFiles | None:
        # The configuration writes TLS as a mapping (possibly all empty: TLS off); code may pass TlsFiles itself.
        if value is None or isinstance(value, TlsFiles):
            return value
        if isinstance(value, Mapping):
            # from_config ignores a mapping without cert or ca (TLS off); a typo there must not pass unnoticed.
            unknown = sorted(set(value) - {f.name for f in fields(TlsFiles)})
            if unknown:
                raise ValueError(f"unknown keys {unknown}; known: cert, key, ca, require_client_cert")
            return TlsFiles.from_config(value)
        raise ValueError(f"a mapping {{cert, key, ca, require_client_cert}}, not {value!r}")
