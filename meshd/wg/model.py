"""Plain values shared by every WireGuard backend: what we want (config) and what is (state).

All are frozen dataclasses. Construction validates and canonicalises (keys -> canonical base64,
networks -> ``ipaddress`` text form, host bits cleared) so that two values describing the same thing compare
equal and the diff (meshd.wg.diff) can work on plain equality. Bad values raise WgConfigError.

Endpoints are ``(host, port)`` tuples, like the rest of the project; hosts are IP address literals
(WireGuard itself never resolves names).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshd.proto.endpoint import Endpoint
from meshd.wg.errors import WgConfigError
from meshd.wg.keys import ZERO_KEY_B64, canonical_key

_IFNAME = re.compile(r"^[A-Za-z0-9_.=+-]{1,15}$")


def check_ifname(name: str) -> str:
    """Validate a Linux interface name (1..15 chars, no '/', ':' or spaces); return it."""
    if not _IFNAME.fullmatch(name) or name in {".", ".."}:
        raise WgConfigError(
            f"invalid interface name {name!r}: use 1 to 15 letters, digits or _.=+- (e.g. mesh0)"
        )
    return name


def canonical_network(text: str) -> str:
    """``'10.0.0.1/24'`` -> ``'10.0.0.0/24'``; a prefix length is required (no bare addresses)."""
    if "/" not in text:
        raise WgConfigError(f"allowed IP {text!r} needs a prefix length, e.g. {text}/32")
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise WgConfigError(f"allowed IP {text!r} is not an IP network") from None


def canonical_interface_address(text: str) -> str:
    """An interface address with prefix (``'100.64.0.1/32'``, ``'fd7a::1/128'``), canonical text."""
    if "/" not in text:
        raise WgConfigError(f"address {text!r} needs a prefix length, e.g. {text}/32")
    try:
        return str(ipaddress.ip_interface(text))
    except ValueError:
        raise WgConfigError(f"address {text!r} is not an IP address with prefix") from None


def canonical_endpoint(endpoint: Endpoint) -> Endpoint:
    host, port = endpoint
    # a zone id ("fe80::1%eth0") may hold any character, newlines included, and would be written
    # verbatim into UAPI text: only plain address literals are endpoints
    if not isinstance(host, str) or "%" in host or not host.isprintable():
        raise WgConfigError(f"endpoint host {host!r} is not a plain IP address (no zone id)")
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise WgConfigError(f"endpoint host {host!r} is not an IP address") from None
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise WgConfigError(f"endpoint port {port!r} is not in 1..65535")
    return (str(addr), port)


def parse_endpoint(text: str) -> Endpoint:
    """Inverse of format_endpoint; WgConfigError when malformed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise WgConfigError(f"endpoint {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise WgConfigError(f"endpoint {text!r}: IPv6 hosts must be in brackets, e.g. [::1]:51820")
    return canonical_endpoint((host, int(port_text)))


def _check_u(value: int, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise WgConfigError(f"{what} {value!r} is not in 0..{(1 << bits) - 1}")
    return value


def canonical_networks(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({canonical_network(v) for v in values}, key=_net_sort_key))


def _net_sort_key(text: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(text)
    return (net.version, int(net.network_address), net.prefixlen)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One desired peer.

    `endpoint` None means "no opinion": a new peer starts without one (it learns it when the peer
    writes first) and an existing peer keeps whatever endpoint it has (roaming, set_endpoint).
    `persistent_keepalive` 0 disables it; an all-zero preshared key means none (None).
    `allowed_ips` is kept sorted and de-duplicated.
    """

    public_key: str
    allowed_ips: tuple[str, ...] = ()
    endpoint: Endpoint | None = None
    persistent_keepalive: int = 0
    preshared_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", canonical_key(self.public_key, "peer public key"))
        object.__setattr__(self, "allowed_ips", canonical_networks(self.allowed_ips))
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", canonical_endpoint(self.endpoint))
        _check_u(self.persistent_keepalive, 16, "persistent keepalive")
        if self.preshared_key is not None:
            psk = canonical_key(self.preshared_key, "preshared key")
            object.__setattr__(self, "preshared_key", None if psk == ZERO_KEY_B64 else psk)


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """The whole desired interface.

    `listen_port` 0 lets the backend pick a free port once; an interface that already listens keeps
    its port. `fwmark` 0 means none. `mtu` None leaves the link's MTU alone. `addresses` are interface
    addresses with prefix (IPv4 and IPv6). `local_addresses` are served on this host only (scope host,
    e.g. the resolver's 100.100.100.100): the kernel never picks one as the source address of mesh
    traffic, which peers would drop (it is not in their AllowedIPs for us).
    """

    name: str
    private_key: str = field(repr=False)
    listen_port: int = 0
    fwmark: int = 0
    addresses: tuple[str, ...] = ()
    mtu: int | None = None
    peers: tuple[PeerConfig, ...] = ()
    local_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_ifname(self.name)
        object.__setattr__(self, "private_key", canonical_key(self.private_key, "private key"))
        _check_u(self.listen_port, 16, "listen port")
        _check_u(self.fwmark, 32, "fwmark")
        addrs = tuple(dict.fromkeys(canonical_interface_address(a) for a in self.addresses))
        object.__setattr__(self, "addresses", addrs)
        local = tuple(dict.fromkeys(canonical_interface_address(a) for a in self.local_addresses))
        object.__setattr__(self, "local_addresses", local)
        if self.mtu is not None and not (isinstance(self.mtu, int) and 576 <= self.mtu <= 65535):
            raise WgConfigError(f"MTU {self.mtu!r} is not in 576..65535")
        keys = [p.public_key for p in self.peers]
        if len(set(keys)) != len(keys):
            raise WgConfigError("the same peer public key appears twice in the config")
        object.__setattr__(self, "peers", tuple(self.peers))


@dataclass(frozen=True, slots=True)
class PeerState:
    """One peer as the backend reports it. `last_handshake` is Unix time in seconds, None if never."""

    public_key: str
    endpoint: Endpoint | None
    allowed_ips: tuple[str, ...]
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int
    preshared_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class InterfaceState:
    """The interface as the backend reports it. `public_key` is None when no private key is set."""

    name: str
    public_key: str | None
    listen_port: int
    fwmark: int
    peers: tuple[PeerState, ...]

    def peer(self, public_key: str) -> PeerState | None:
        """The peer with this public key, or None."""
        for p in self.peers:
            if p.public_key == public_key:
                return p
        return None
