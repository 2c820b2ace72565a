"""Our own candidate addresses (sans-IO): LAN, STUN-reflexive and port-mapped.

:class:`Gatherer` asks the coordinator's STUN ports for our public address(es) with a
:class:`meshd.proto.stun.BindingClient` (two ports per region: if they see different mappings, our NAT's
mapping varies by destination), records the answers and the router's port map in a
:class:`meshd.nat.strategy.NatInfo`, and lists every address a peer may reach us at. It also knows our
networks, which tell a peer's LAN candidates (preferred when on one of our LANs) from public ones.

IPv6 (issue 15): our global IPv6 addresses are candidates as they are (no NAT in front of them, only a
stateful firewall that the two sides' simultaneous probes open, like a NAT's filter), and so are unique
local addresses (fc00::/7), which a peer uses only when it sits on the same segment: a ULA elsewhere is
somebody else's network (and the overlay's own addresses are ULAs on the mesh interface, which is never
gathered). Link-local, loopback, multicast, site-local and IPv4-mapped addresses are never candidates.
STUN over IPv6 (a separate client, so IPv6 answers never count as the IPv4 NAT's mapping and an
unanswered IPv6 server never makes IPv4 look blocked) adds the address a server saw, should a NAT66 or
prefix translation sit in between. IPv6 servers are asked only while we have an IPv6 candidate.

Probes and STUN leave from whichever source address the kernel picks (no explicit source), as
WireGuard's own packets do: with several global addresses (privacy extensions) the address a peer sees,
and so the firewall state both sides create, is the one WireGuard will use. Every address is announced,
so the peer probes that one too (or learns it as peer-reflexive from our answer).
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

_ULA = ipaddress.IPv6Network("fc00::/7")
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")


def ipv6_scope(addr: str) -> str | None:
    """ "global" or "ula" for an IPv6 address that may be a candidate, None for any other address.

    Not ``ipaddress``'s ``is_global``: it calls documentation (2001:db8::/32) and other special-purpose
    prefixes private, but they route like any global unicast address (the lab uses 2001:db8::/32).
    """
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if not isinstance(ip, ipaddress.IPv6Address) or ip.scope_id is not None:
        return None
    if ip.is_link_local or ip.is_loopback or ip.is_multicast or ip.is_unspecified:
        return None
    if ip.ipv4_mapped is not None or ip in _SITE_LOCAL:
        return None
    return "ula" if ip in _ULA else "global"


class Gatherer:
    """What STUN, the router and our interfaces say about where we can be reached."""

    def __init__(self, port: int, nat: NatInfo) -> None:
        self.port = port
        self.nat = nat
        self.servers: list[Endpoint] = []
        self._local: list[Endpoint] = []
        self._local6: list[Endpoint] = []  #: global and unique local IPv6 addresses
        self._networks: list[Network] = []
        self._stun = stun.BindingClient(rto=0.2, max_sends=5, software="meshd")
        self._stun6 = stun.BindingClient(rto=0.2, max_sends=5, software="meshd")
        self.reflexive6: dict[Endpoint, Endpoint] = {}  #: IPv6 STUN server -> the address it saw

    # --- inputs ----------------------------------------------------------------------------------------

    def set_local(self, networks: Mapping[str, Network]) -> None:
        """Our addresses, ``{"ifname/addr": network}`` (see the module docstring for IPv6)."""
        addrs = [key.split("/", 1)[-1] for key in networks]
        self._local = [(a, self.port) for a in addrs if ":" not in a]
        # global first: a ULA only helps a peer on the same segment
        six = sorted((a for a in addrs if ipv6_scope(a) is not None), key=lambda a: ipv6_scope(a) == "ula")
        self._local6 = [(str(ipaddress.IPv6Address(a)), self.port) for a in six]
        self._networks = list(networks.values())

    def set_servers(self, servers: Iterable[Endpoint], now: float) -> bool:
        """Where to learn our public address; new servers are asked at once. True if the list changed."""
        new = list(dict.fromkeys(servers))
        if new == self.servers:
            return False
        self.servers = new
        self.nat.reflexive = {k: v for k, v in self.nat.reflexive.items() if k in new}
        self.reflexive6 = {k: v for k, v in self.reflexive6.items() if k in new}
        self.query(now)
        return True

    def set_portmap(self, protocol: str | None, external: Endpoint | None) -> None:
        self.nat.portmap = protocol
        self.nat.portmapped = external

    def query(self, now: float) -> None:
        """Ask every STUN server (again); IPv6 ones only while we have an IPv6 candidate."""
        for server in self.servers:
            if ":" not in server[0]:
                self._stun.query(server, now)
            elif any(ipv6_scope(a) == "global" for a, _ in self._local6):
                self._stun6.query(server, now)

    def receive(self, data: bytes, src: Endpoint, now: float) -> None:
        (self._stun6 if ":" in src[0] else self._stun).receive(data, src, now)

    def handle_timer(self, now: float) -> None:
        self._stun.handle_timer(now)
        self._stun6.handle_timer(now)

    # --- outputs ---------------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        timers = [t for t in (self._stun.next_timer(), self._stun6.next_timer()) if t is not None]
        return min(timers) if timers else None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        return self._stun.datagrams_to_send(now) + self._stun6.datagrams_to_send(now)

    @property
    def idle(self) -> bool:
        """No IPv4 STUN question is waiting for an answer (what punching waits for: IPv6 candidates are
        our own addresses, known without asking)."""
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
        return self._results6() or changed

    def _results6(self) -> bool:
        changed = False
        while (ev := self._stun6.next_event()) is not None:
            if isinstance(ev, stun.BindingSucceeded):
                if self.reflexive6.get(ev.server) != ev.mapped:
                    self.reflexive6[ev.server] = ev.mapped
                    changed = True
                    log.info(
                        "IPv6 address seen by %s: %s", format_endpoint(ev.server), format_endpoint(ev.mapped)
                    )
            else:  # not UDP blocked: IPv6 may simply not reach that far
                log.debug("STUN %s: %s", format_endpoint(ev.server), ev.reason)
        return changed

    def candidates(self) -> list[Endpoint]:
        """Every address a peer may reach us at: LAN, STUN-reflexive, port-mapped, then IPv6 (our
        addresses, then what IPv6 STUN saw)."""
        out: list[Endpoint] = list(self._local)
        out += self.nat.reflexive.values()
        if self.nat.portmapped is not None:
            out.append(self.nat.portmapped)
        out += self._local6
        out += (m for m in self.reflexive6.values() if ipv6_scope(m[0]) is not None)
        return list(dict.fromkeys(out))

    def on_link(self, addr: Endpoint) -> bool:
        """``addr`` is on one of our own IPv4 networks: a probe to it never passes a router (issue 15)."""
        try:
            ip = ipaddress.ip_address(addr[0])
        except ValueError:
            return False
        return ip.version == 4 and any(ip in n for n in self._networks if n.version == 4)

    def classify(self, cands: Iterable[Endpoint]) -> list[Candidate]:
        """A peer's candidates: LAN when on one of our networks, public otherwise. IPv6 addresses that
        can never be a path are dropped, and so is a unique local address off our segments."""
        out = []
        for host, port in cands:
            ip = ipaddress.ip_address(host)
            lan = any(ip in n for n in self._networks if n.version == ip.version)
            if ip.version == 6 and (scope := ipv6_scope(host)) != "global" and not (scope == "ula" and lan):
                continue
            out.append(Candidate((host, port), CandidateKind.LAN if lan else CandidateKind.PUBLIC))
        return out
