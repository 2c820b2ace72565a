"""From a network map to what this host should configure: verified peers, WireGuard peers, host names.

Pure functions (``now`` is passed in). A peer is configured only when its node certificate verifies
against a pinned coordinator key, is valid at ``now`` and agrees with the map entry (same WireGuard key,
same node id, same addresses): the coordinator's map alone is never trusted to add a key to WireGuard.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from meshd.proto import cert
from meshd.proto.endpoint import Endpoint
from meshd.proto.netmap import NetMap, Peer
from meshd.wg.model import PeerConfig

#: Keeps NAT mappings and stateful firewalls open (the WireGuard whitepaper's suggestion, as wg-quick).
KEEPALIVE_SECONDS = 25


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """A map peer whose certificate checked out."""

    peer: Peer
    cert: cert.CertPayload

    @property
    def name(self) -> str:
        return self.cert.name

    @property
    def ips(self) -> tuple[str, ...]:
        return self.cert.ips


@dataclass(frozen=True, slots=True)
class Rejected:
    """A map peer we refuse to configure, and why (logged, shown nowhere else)."""

    node_id: int
    name: str
    reason: str


def verify_peers(
    netmap: NetMap, trusted_keys: Iterable[bytes], now: float
) -> tuple[list[VerifiedPeer], list[Rejected]]:
    """Split the map's peers into verified ones and rejected ones (with the reason)."""
    keys = list(trusted_keys)
    good: list[VerifiedPeer] = []
    bad: list[Rejected] = []
    for p in netmap.peers:
        try:
            payload = cert.verify(p.cert, keys, now)
        except cert.CertError as e:
            bad.append(Rejected(p.node_id, p.name, f"certificate: {e}"))
            continue
        if payload.wg_public_key != p.wg_public_key or payload.node_id != p.node_id:
            bad.append(Rejected(p.node_id, p.name, "certificate does not match the map entry"))
            continue
        if set(payload.ips) != set(p.ips):
            bad.append(Rejected(p.node_id, p.name, "certificate addresses differ from the map"))
            continue
        good.append(VerifiedPeer(p, payload))
    return good, bad


def wg_peers(
    peers: Iterable[VerifiedPeer],
    endpoint_for: Callable[[VerifiedPeer], Endpoint | None],
    has_path: Callable[[VerifiedPeer], bool] = lambda v: False,
    routes: Mapping[int, tuple[str, ...]] | None = None,
) -> tuple[PeerConfig, ...]:
    """WireGuard peers: allowed IPs are exactly the certificate's addresses; the endpoint comes from the
    path logic (relay proxy or a direct address), None keeps whatever WireGuard has (roaming, or what
    the traversal engine set). Keepalive only for peers with a path: keepalive on a peer without an
    endpoint makes WireGuard burn its handshake attempt and wait 5 s (REKEY_TIMEOUT) for the next.
    `routes`: node id -> prefixes routed through that peer (meshd.routing), added to its allowed IPs."""
    out = []
    for v in peers:
        endpoint = endpoint_for(v)
        out.append(
            PeerConfig(
                public_key=v.peer.wg_public_key,
                allowed_ips=(*(host_prefix(ip) for ip in v.ips), *(routes or {}).get(v.peer.node_id, ())),
                endpoint=endpoint,
                persistent_keepalive=KEEPALIVE_SECONDS if endpoint is not None or has_path(v) else 0,
            )
        )
    return tuple(out)


def host_entries(peers: Iterable[VerifiedPeer]) -> list[tuple[str, str]]:
    """(address, name) pairs for the hosts block: every overlay address of every verified peer."""
    out: list[tuple[str, str]] = []
    for v in sorted(peers, key=lambda v: v.name):
        for ip in v.ips:
            out.append((str(ipaddress.ip_interface(ip).ip), v.name))
    return out


def parse_candidates(endpoints: Iterable[str]) -> list[Endpoint]:
    """Map endpoint strings ("ip:port", "[v6]:port") to tuples, skipping malformed ones."""
    out: list[Endpoint] = []
    for text in endpoints:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            continue
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if 0 < int(port) < 65536:
            out.append((str(ip), int(port)))
    return out


def first_reachable_candidate(
    candidates: Iterable[Endpoint],
    local_networks: Mapping[str, ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> Endpoint | None:
    """Without traversal: prefer a candidate on one of our own LANs, else the first public one.

    A private address on someone else's LAN is useless to us, so it is skipped unless it is on ours.
    """
    cands = list(candidates)
    nets = list(local_networks.values())
    for host, port in cands:
        ip = ipaddress.ip_address(host)
        if any(ip in n for n in nets if n.version == ip.version):
            return host, port
    for host, port in cands:
        ip = ipaddress.ip_address(host)
        if ip.is_global or not (ip.is_private or ip.is_loopback or ip.is_link_local):
            return host, port
    return None


def host_prefix(ip: str) -> str:
    iface = ipaddress.ip_interface(ip)
    return f"{iface.ip}/{iface.max_prefixlen}"
