"""Applying a network map to this host: verify, firewall, WireGuard, relay, paths, hosts.

:meth:`MapApplier.apply` runs for every full map or delta from the coordinator. The order matters:

1. verify every peer's certificate against the trusted coordinator keys (meshd.peerset); a peer whose
   certificate does not check out is logged and never configured;
2. the firewall (policy layer 2) first, so that a newly visible peer never finds an open door; if nft
   fails, no peer is configured at all (fail closed) and ``firewall_error`` says why;
3. relay regions and peers' home regions (the relay is every new peer's first path);
4. WireGuard, reconciled by diff (an unchanged peer keeps its session); then the relay is told which
   peers WireGuard has (what a new peer sent through it meanwhile was held: meshd.relay.waiting);
5. the path strategy's STUN servers and peers (meshd.nat.strategy);
6. our block of the hosts file.

A change of our local addresses does not come through here: the daemon hands it to the path strategy and
calls :meth:`reconcile` (WireGuard only), which is all that depends on it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from meshd import firewall, hosts, peerset
from meshd.credentials import Credentials
from meshd.nat.strategy import PathStrategy, PeerInfo
from meshd.proto import netmap
from meshd.proto.encoding import b64decode
from meshd.proto.endpoint import Endpoint
from meshd.relay.manager import RelayManager
from meshd.router import RouteService
from meshd.wg.base import WireGuardBackend
from meshd.wg.keys import b64_from_bytes
from meshd.wg.model import InterfaceConfig

log = logging.getLogger("meshd")

MESH_MTU = 1280  #: the IPv6 minimum: fits inside any underlay, relay framing included


class MapApplier:
    """Holds the last map and the peers verified from it; applies maps to the host."""

    def __init__(
        self,
        *,
        interface: str,
        listen_port: int,
        creds: Credentials,
        backend: WireGuardBackend,
        fw: firewall.Firewall,
        hosts_file: hosts.HostsFile,
        clock: Callable[[], float],
    ) -> None:
        self.interface = interface
        self.listen_port = listen_port
        self.creds = creds
        self.backend = backend
        self.firewall = fw
        self.hosts = hosts_file
        self.clock = clock
        self.relay: RelayManager | None = None
        self.paths: PathStrategy | None = None
        self.map: netmap.NetMap | None = None
        self.verified: list[peerset.VerifiedPeer] = []
        self._lock = asyncio.Lock()
        self._resolved: dict[str, str] = {}
        self.firewall_error: str | None = None  #: why no peer is configured (nft failed), else None
        self.routes: RouteService | None = None  #: subnet routes and exit nodes (meshd/router.py)
        self.routed: dict[int, tuple[str, ...]] = {}  #: node id -> prefixes routed through it now
        #: addresses on the interface besides our own (the resolver's, meshd.dns), scope host: never a
        #: peer's, never the source of mesh traffic
        self.extra_addresses: tuple[str, ...] = ()
        self.write_hosts = True  #: False with --dns resolved/off: names come from the resolver only
        #: called with every applied map and the peers configured from it (the resolver's zone)
        self.on_names: Callable[[netmap.NetMap | None, list[peerset.VerifiedPeer]], None] | None = None

    async def apply(self, new: netmap.NetMap) -> None:
        """Verify, firewall, relay, reconcile WireGuard, paths, hosts block (in that order).

        ``map`` becomes ``new`` only once WireGuard took it: after a WgError the session resumes from the
        previous version, so the coordinator sends what failed again."""
        await self.creds.learn_signing_keys(new)
        good, bad = peerset.verify_peers(new, self.creds.trusted_keys, self.clock())
        for r in bad:
            log.warning("not configuring peer %s (node %d): %s", r.name, r.node_id, r.reason)
        self.firewall.local_only = bool(new.self_node.routes)  # we forward: rules for us stay ours
        try:
            await self.firewall.update(new.inbound)
        except firewall.FirewallError as e:
            # fail closed: a peer whose inbound rules are not in force would reach every port on this
            # host, so no peer is configured until a later map's rules install (status shows why)
            self.firewall_error = str(e)
            log.error("firewall: %s; configuring no peers until the rules apply", e)
            good = []
        else:
            self.firewall_error = None
        self.verified = good
        if self.routes is not None:
            await self.routes.on_map(new)
        if self.relay is not None:
            self.relay.set_regions(new.relays)
            self.relay.set_peers((v.peer.wg_public_key, v.peer.relay_home) for v in good)
        await self.reconcile()
        self.map = new
        if self.paths is not None:
            self.paths.set_stun_servers(await self._stun_servers(new))
            self.paths.set_peers(peer_info(v) for v in good)
        if self.on_names is not None:
            self.on_names(new, good)
        if not self.write_hosts:
            return
        try:
            self.hosts.update(hosts.peer_entries(((v.name, v.ips) for v in good), new.dns_records))
        except hosts.HostsError as e:
            log.error("hosts file: %s", e)

    async def reconcile(self, peers: list[peerset.VerifiedPeer] | None = None) -> None:
        """Bring WireGuard in line with our key, addresses and ``peers`` (default: the verified ones)."""
        chosen = self.verified if peers is None else peers
        paths = self.paths
        if self.routes is not None:
            self.routed = await self.routes.through([v.peer for v in chosen])
        desired = InterfaceConfig(
            name=self.interface,
            private_key=b64_from_bytes(self.creds.keys.wg_private),
            listen_port=self.listen_port,
            addresses=tuple(peerset.host_prefix(ip) for ip in self.creds.enrollment.ips),
            local_addresses=self.extra_addresses,
            mtu=MESH_MTU,
            fwmark=self.routes.fwmark if self.routes is not None else 0,
            peers=peerset.wg_peers(
                chosen,
                lambda v: (
                    paths.endpoint_for(v.peer.wg_public_key, peerset.parse_candidates(v.peer.endpoints))
                    if paths is not None
                    else None
                ),
                lambda v: paths is not None and paths.keepalive_on(v.peer.wg_public_key),
                self.routed,
            ),
        )
        async with self._lock:
            ops = await self.backend.apply(desired)
            if self.routes is not None:  # exit node: policy routing once WireGuard has the routes
                await self.routes.settle(self.routed)
        if self.relay is not None:  # relayed handshakes from a new peer waited for this (meshd.relay.waiting)
            self.relay.configured(p.public_key for p in desired.peers)
        if ops:
            log.info("wireguard: %d change(s)", len(ops))

    async def drop_peers(self) -> None:
        """The coordinator no longer accepts us: no peer stays configured, no name stays in hosts."""
        self.verified = []
        if self.on_names is not None:
            self.on_names(None, [])
        await self.reconcile([])
        try:
            if self.write_hosts:
                self.hosts.update([])
        except hosts.HostsError as e:
            log.error("hosts file: %s", e)

    def peer_by_name(self, name: str) -> peerset.VerifiedPeer | None:
        bare = name.removesuffix("." + self.creds.enrollment.domain)
        return next((v for v in self.verified if v.name == bare), None)

    async def _stun_servers(self, m: netmap.NetMap) -> list[Endpoint]:
        """Each relay region's STUN port and the one after it (two destinations: mapping variance), and
        its IPv6 address's STUN port (issue 15: the gatherer asks it only while we have IPv6)."""
        out: list[Endpoint] = []
        for region in m.relays:
            if not region.stun_port:
                continue
            if region.ipv6:
                out.append((region.ipv6, region.stun_port))
            host = urlsplit(region.url).hostname or ""
            if ":" in host:  # an IPv6 literal URL: that is the IPv6 server
                try:
                    out.append((str(ipaddress.IPv6Address(host)), region.stun_port))
                except ValueError:
                    log.warning("relay region %s: bad IPv6 host %r", region.name, host[:64])
                continue
            ip = self._resolved.get(host)
            if ip is None:
                try:
                    infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET)
                    ip = self._resolved[host] = str(infos[0][4][0])
                except (OSError, IndexError, UnicodeError):
                    log.warning("cannot resolve relay region %s (%s)", region.name, host)
                    continue
            out.append((ip, region.stun_port))
            if region.stun_port < 65535:  # the second destination only when it is a port (no overflow)
                out.append((ip, region.stun_port + 1))
        return out


def peer_info(v: peerset.VerifiedPeer) -> PeerInfo:
    return PeerInfo(
        name=v.name,
        node_id=v.peer.node_id,
        wg_key=v.peer.wg_public_key,
        node_key=b64decode(v.peer.node_public_key, length=32),
        candidates=tuple(peerset.parse_candidates(v.peer.endpoints)),
    )
