"""Our own candidate addresses (sans-IO): LAN, STUN-reflexive and port-mapped.

:class:`Gatherer` asks the coordinator's STUN ports for our public address(es) with a
:class:`meshd.proto.stun.BindingClient` (two ports per region: if they see different mappings, our NAT's
mapping varies by destination), records the answers and the router's port map in a
:class:`meshd.nat.strategy.NatInfo`, and lists every address a peer may reach us at. It also knows our
networks, which tell a peer's LAN candidates (preferred when on one of our LANs) from public ones.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping

from meshd.nat.strategy import NatInfo, Network
from meshd.paths import Candidate, CandidateKind
from meshd.proto import stun
from meshd.proto.endpoint import Endpoint, format_endpoint

log = logging.getLogger("meshd.nat")


class Gatherer:
    """What STUN, the router and our interfaces say about where we can be reached."""

    def __init__(self, port: int, nat: NatInfo) -> None:
        self.port = port
        self.nat = nat
        self.servers: list[Endpoint] = []
        self._local: list[Endpoint] = []
        self._networks: list[Network] = []
        self._stun = stun.BindingClient(rto=0.2, max_sends=5, software="meshd")

    # --- inputs ----------------------------------------------------------------------------------------

    def set_local(self, networks: Mapping[str, Network]) -> None:
        """Our addresses, ``{"ifname/addr": network}``; the raw socket speaks IPv4 only."""
        addrs = (key.split("/", 1)[-1] for key in networks)
        self._local = [(a, self.port) for a in addrs if ":" not in a]
        self._networks = list(networks.values())

    def set_servers(self, servers: Iterable[Endpoint], now: float) -> bool:
        """Where to learn our public address; new servers are asked at once. True if the list changed."""
        new = list(dict.fromkeys(servers))
        if new == self.servers:
            return False
        self.servers = new
        self.nat.reflexive = {k: v for k, v in self.nat.reflexive.items() if k in new}
        self.query(now)
        return True

    def set_portmap(self, protocol: str | None, external: Endpoint | None) -> None:
        self.nat.portmap = protocol
        self.nat.portmapped = external

    def query(self, now: float) -> None:
        """Ask every STUN server (again)."""
        for server in self.servers:
            self._stun.query(server, now)

    def receive(self, data: bytes, src: Endpoint, now: float) -> None:
        self._stun.receive(data, src, now)

    def handle_timer(self, now: float) -> None:
        self._stun.handle_timer(now)

    # --- outputs ---------------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        return self._stun.next_timer()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        return self._stun.datagrams_to_send(now)

    @property
    def idle(self) -> bool:
        """No STUN question is waiting for an answer."""
        return self._stun.pending == 0

    def results(self) -> bool:
        """Record the STUN answers that arrived; True if our public address(es) changed."""
        changed = False
        while (ev := self._stun.next_event()) is not None:
            if isinstance(ev, stun.BindingSucceeded):
                if self.nat.reflexive.get(ev.server) != ev.mapped:
                    self.nat.reflexive[ev.server] = ev.mapped
                    changed = True
            else:
                self.nat.stun_unanswered = True
                log.debug("STUN %s: %s", format_endpoint(ev.server), ev.reason)
        if changed:
            log.info(
                "public address(es): %s (mapping varies by destination: %s)",
                ", ".join(sorted({format_endpoint(m) for m in self.nat.reflexive.values()})),
                self.nat.mapping_varies_by_dest,
            )
        return changed

    def candidates(self) -> list[Endpoint]:
        """Every address a peer may reach us at: LAN, STUN-reflexive, port-mapped (in that order)."""
        out: list[Endpoint] = list(self._local)
        out += self.nat.reflexive.values()
        if self.nat.portmapped is not None:
            out.append(self.nat.portmapped)
        return list(dict.fromkeys(out))

    def classify(self, cands: Iterable[Endpoint]) -> list[Candidate]:
        """A peer's candidates: LAN when on one of our networks, public otherwise."""
        out = []
        for host, port in cands:
            ip = ipaddress.ip_address(host)
            lan = any(ip in n for n in self._networks if n.version == ip.version)
            out.append(Candidate((host, port), CandidateKind.LAN if lan else CandidateKind.PUBLIC))
        return out
