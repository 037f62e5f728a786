"""DICOM over TLS (PS3.15 Annex B.1, the "Basic TLS Secure Transport Connection Profile"): the SSL contexts of
the receiver and of outbound C-STORE, and which peers may use which AE title.

pynetdicom wraps each accepted socket with ``ssl_context.wrap_socket(sock, server_side=True)`` inside its accept
loop, which performs the TLS handshake right there, with no timeout: one client that opens a connection and never
says hello would stop the whole listener. :class:`DeferredHandshakeContext` hands pynetdicom a socket whose
handshake has not happened yet; it then happens on the association's own thread, on the first read, bounded by the
socket timeout the receiver sets on every connection (``scp.network_timeout_s``).
"""
from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: TLS versions below this are refused both ways (BCP 195; PS3.15 B.1 allows TLS 1.2 and 1.3).
MINIMUM_TLS = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one TLS endpoint. ``ca``: whom we trust; ``cert``/``key``: who we are (optional for a client)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    #: Receiver: refuse peers without a certificate signed by ``ca`` (mutual TLS).
    require_client_cert: bool = True
    #: Sender: the name the peer's certificate must carry; empty: the destination's host.
    server_name: str = ""

    @classmethod
    def from_config(cls, entry: Mapping[str, object] | None) -> "TlsFiles | None":
        """``None`` when TLS is not configured (no entry, or neither a certificate nor a CA named)."""
        if not entry or not (entry.get("cert") or entry.get("ca")):
            return None
        unknown = set(entry) - {"cert", "key", "ca", "require_client_cert", "server_name"}
        if unknown:
            raise ValueError(f"tls: unknown keys {sorted(unknown)}; known: cert, key, ca, require_client_cert, "
                             "server_name")
        return cls(cert=str(entry.get("cert") or ""), key=str(entry.get("key") or ""), ca=str(entry.get("ca") or ""),
                   require_client_cert=bool(entry.get("require_client_cert", True)),
                   server_name=str(entry.get("server_name") or ""))


def _readable(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"TLS {what} {path!r} does not exist or is not a file")
    return path


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The receiver's context: our certificate and key, and (for mutual TLS) the CA that signs the peers'."""
    if not files.cert or not files.key:
        raise ValueError("scp.tls needs both cert and key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_TLS
    context.load_cert_chain(_readable(files.cert, "certificate"), _readable(files.key, "key"))
    if files.ca:
        context.load_verify_locations(cafile=_readable(files.ca, "CA bundle"))
    if files.require_client_cert:
        if not files.ca:
            raise ValueError("scp.tls.require_client_cert needs scp.tls.ca (the CA that signs the senders)")
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_OPTIONAL if files.ca else ssl.CERT_NONE
    return context


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A sender's context: verifies the peer against ``ca`` (or the system store) and its name; presents our
    certificate when one is configured (peers that require mutual TLS ask for it)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=_readable(files.ca, "CA bundle") if files.ca else None)
    context.minimum_version = MINIMUM_TLS
    if files.cert:
        if not files.key:
            raise ValueError("a destination's tls.cert needs tls.key")
        context.load_cert_chain(_readable(files.cert, "certificate"), _readable(files.key, "key"))
    return context


class DeferredHandshakeContext:
    """An :class:`ssl.SSLContext` stand-in for pynetdicom's listener: wraps sockets without handshaking.

    The handshake then runs inside the first ``recv`` on the association's thread (OpenSSL's ``SSL_read``
    negotiates when needed), where the receiver's socket timeout bounds it; a failed handshake (an untrusted
    client certificate) ends that association only.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def wrap_socket(self, sock, server_side: bool = True, **kwargs):  # noqa: ANN001 (socket types vary)
        return self.context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.context, name)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PeerBindings:
    """Calling AE title -> the networks it may connect from (``scp.ae_hosts``).

    An AE title with bindings is refused from any other address; one without bindings is governed by the
    AE-title allow-list alone. Entries are IP addresses or CIDR networks (host names are resolved by whoever
    writes the configuration, not at every association: DNS must not decide who may send images).
    """

    def __init__(self, bindings: Mapping[str, Iterable[str]] | None = None) -> None:
        self._networks: dict[str, list[Network]] = {}
        for ae_title, hosts in (bindings or {}).items():
            if isinstance(hosts, str):
                hosts = [hosts]
            networks = []
            for host in hosts:
                try:
                    networks.append(ipaddress.ip_network(str(host).strip(), strict=False))
                except ValueError as exc:
                    raise ValueError(f"scp.ae_hosts.{ae_title}: {host!r} is not an IP address or CIDR network "
                                     "(resolve host names when writing the configuration)") from exc
            if not networks:
                raise ValueError(f"scp.ae_hosts.{ae_title}: no address given (remove the entry to unbind it)")
            self._networks[str(ae_title).strip()] = networks

    @property
    def ae_titles(self) -> list[str]:
        return list(self._networks)

    def permits(self, ae_title: str, address: str) -> bool:
        """Whether ``ae_title`` may associate from ``address`` (True for AE titles without bindings)."""
        networks = self._networks.get(ae_title.strip())
        if networks is None:
            return True
        try:
            peer = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        return any(peer.version == network.version and peer in network for network in networks)
