"""Who may send final reports over MLLP, and how the listener protects itself (TLS, connection and time limits).

A final ORU takes a study off the worklist and its text becomes training ground truth, so the listener only takes
reports from configured senders: each entry names a sending application (MSH-3), optionally its facility (MSH-4)
and the IP addresses or CIDR networks it sends from. Connections from an address no entry allows are closed before
a byte is read; messages whose MSH-3/MSH-4 no entry allows from that address are rejected (AR) and kept.
"""
from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pacs_bridge.dicom_tls import TlsFiles, server_context

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # IPv4 peers on a dual-stack socket
    return address


@dataclass(frozen=True)
class AllowedSender:
    """MSH-3 sending application; MSH-4 facility ('' = any); networks it may connect from (empty = any)."""

    application: str
    facility: str = ""
    networks: tuple[Network, ...] = ()

    def permits_address(self, address: str) -> bool:
        if not self.networks:
            return True
        peer = _address(address)
        return peer is not None and any(peer.version == n.version and peer in n for n in self.networks)


class SenderAllowList:
    """The configured senders (``fairness.mllp_senders``); empty: every sender is allowed (and a warning logged)."""

    def __init__(self, senders: Sequence[AllowedSender] = ()) -> None:
        self.senders = tuple(senders)

    @classmethod
    def from_config(cls, entries: Sequence[Mapping[str, object]] | None) -> SenderAllowList:
        senders = []
        for index, entry in enumerate(entries or []):
            where = f"fairness.mllp_senders[{index}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: expected a mapping {{application, facility, hosts}}, got {entry!r}")
            unknown = set(entry) - {"application", "facility", "hosts"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: application, facility, hosts")
            application = str(entry.get("application") or "").strip()
            if not application:
                raise ValueError(f"{where}: application (MSH-3) is required")
            hosts = entry.get("hosts") or []
            if isinstance(hosts, str):
                hosts = [hosts]
            networks = []
            for host in hosts:  # type: ignore[union-attr]
                try:
                    networks.append(ipaddress.ip_network(str(host).strip(), strict=False))
                except ValueError as exc:
                    raise ValueError(f"{where}.hosts: {host!r} is not an IP address or CIDR network") from exc
            senders.append(AllowedSender(application, str(entry.get("facility") or "").strip(), tuple(networks)))
        return cls(senders)

    @property
    def open(self) -> bool:
        return not self.senders

    def permits_connection(self, address: str) -> bool:
        """Whether any configured sender may connect from ``address``."""
        return self.open or any(sender.permits_address(address) for sender in self.senders)

    def refusal(self, application: str, facility: str, address: str) -> str | None:
        """Why a message from MSH-3 ``application`` / MSH-4 ``facility`` at ``address`` is refused, or None."""
        if self.open:
            return None
        for sender in self.senders:
            if sender.application == application and sender.facility in ("", facility) \
                    and sender.permits_address(address):
                return None
        return (f"sending application {application!r} facility {facility!r} (MSH-3/MSH-4) from {address} is not "
                "an allowed sender (fairness.mllp_senders)")


@dataclass(frozen=True)
class MllpLimits:
    """How much one peer may hold of the listener."""

    #: Connections open at once; more are closed as they arrive.
    max_connections: int = 32
    #: Seconds a connection may stay silent between messages (interface engines keep connections open).
    idle_timeout_s: float = 600.0
    #: Seconds from a message's first byte to its end block (and for a TLS handshake): dripped messages are cut.
    message_timeout_s: float = 30.0
    #: Bytes one message may have.
    max_message_bytes: int = 4 * 1024 * 1024


def mllp_tls_context(entry: Mapping[str, object] | None) -> ssl.SSLContext | None:
    """The listener's TLS context from ``fairness.mllp_tls`` (PEM cert, key, ca, require_client_cert), or None."""
    files = TlsFiles.from_config(entry)
    if files is None:
        return None
    if not files.cert or not files.key:
        raise ValueError("fairness.mllp_tls needs both cert and key (PEM files)")
    if files.require_client_cert and not files.ca:
        raise ValueError("fairness.mllp_tls.require_client_cert needs fairness.mllp_tls.ca (the CA of the senders)")
    return server_context(files)
