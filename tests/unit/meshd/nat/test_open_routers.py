"""Two TraversalCores behind Linux routers without an input firewall, links without latency, virtual clock.

The routers are modelled the way netfilter behaves (and the netns lab's ``eim-nofw`` kind shows):

* a new flow from the host first tries the port of the newest flow of the same source, even one that
  expired but was not collected yet (``find_appropriate_src``), then its own source port, then a port
  nobody can predict, whichever gives a flow that clashes with no live entry; a packet with a TTL of 1
  refreshes the entry of its flow but dies at the router (an entry for a new flow is never confirmed);
* a packet from the internet that matches no entry is delivered to the router itself, which keeps an
  entry for it (the "poison": a later flow of the host towards that address and port must move);
* entries live 30 s after their last packet (unreplied UDP); an expired entry is collected when a packet
  of its flow arrives, when a new flow would clash with it, or by the garbage collector (here: never).

Links take 50 µs, so the first probes never cross; only the sequenced rounds of :mod:`meshd.paths`
(a keeper refreshing its mapping with TTL-1 probes while the quiet side lets its router's poison expire)
lead to a direct path. The tests check that they do, whatever the order of the first probes.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import pytest

from meshd.nat.core import CallPeer, Datagram, TraversalCore
from meshd.nat.strategy import PeerInfo
from meshd.paths import PathKind
from meshd.proto import disco
from meshd.proto.endpoint import Endpoint

WALL = 1_767_225_600.0
LINK = 0.00005  #: one way, router to router: probes never cross
UDP_TIMEOUT = 30.0  #: nf_conntrack_udp_timeout
PORT = 41641

Flow = tuple[Endpoint, Endpoint]  # (source, destination)


@dataclass
class Entry:
    orig: Flow
    reply: Flow
    expires: float
    inside: Endpoint | None  #: the host behind the router, None for the router's own ("poison")


@dataclass
class Router:
    public_ip: str
    entries: list[Entry] = field(default_factory=list)  #: oldest first, expired ones until collected
    _ports: itertools.count[int] = field(default_factory=lambda: itertools.count(20000, 7))

    def _lookup(self, flow: Flow, now: float) -> Entry | None:
        """The live entry of ``flow`` (either direction); an expired one is collected on the way."""
        for e in list(self.entries):
            if flow in (e.orig, e.reply):
                if e.expires > now:
                    return e
                self.entries.remove(e)
        return None

    def _taken(self, flow: Flow, now: float) -> bool:
        return self._lookup(flow, now) is not None

    def outbound(self, src: Endpoint, dst: Endpoint, ttl: int | None, now: float) -> Endpoint | None:
        """The translated source of a host's packet, or None when it dies here."""
        e = self._lookup((src, dst), now)
        if e is not None:
            e.expires = now + UDP_TIMEOUT  # conntrack runs before the TTL check
            return None if ttl == 1 else e.reply[1]
        if ttl == 1:
            return None  # never confirmed: no entry
        newest = next((e.reply[1] for e in reversed(self.entries) if e.inside == src), None)
        public = next(
            (
                p
                for p in (newest, (self.public_ip, src[1]))
                if p is not None and not self._taken((dst, p), now)
            ),
            None,
        )
        while public is None or self._taken((dst, public), now):
            public = (self.public_ip, next(self._ports))
        self.entries.append(Entry((src, dst), (dst, public), now + UDP_TIMEOUT, src))
        return public

    def inbound(self, src: Endpoint, dst: Endpoint, now: float) -> Endpoint | None:
        """The inside host a packet from the internet goes to, or None (the router took it)."""
        e = self._lookup((src, dst), now)
        if e is not None:
            e.expires = now + UDP_TIMEOUT
            return e.inside if e.reply == (src, dst) else None
        self.entries.append(Entry((src, dst), (dst, src), now + UDP_TIMEOUT, None))
        return None


@dataclass
class Node:
    name: str
    node_id: int
    seed: bytes
    router: Router
    core: TraversalCore
    inside: Endpoint
    direct_at: float | None = None

    @property
    def info(self) -> PeerInfo:
        node_key = disco.DiscoKeys(self.seed).public
        cands = ((self.router.public_ip, PORT), self.inside)  # the LAN address is probed too (in vain)
        return PeerInfo(self.name, self.node_id, f"wg-{self.name}", node_key, cands)


class Internet:
    def __init__(self, *, signal_latency: tuple[float, float] = (0.05, 0.05)) -> None:
        self.now = 0.0
        self.signal_latency = signal_latency  # a's signals to b, b's to a
        self._queue: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self.nodes = [
            Node(
                "a",
                1,
                b"a" * 32,
                Router("6.0.0.2"),
                TraversalCore(b"a" * 32, PORT, relay_up=True),
                ("192.168.1.10", PORT),
            ),
            Node(
                "b",
                2,
                b"b" * 32,
                Router("6.0.0.3"),
                TraversalCore(b"b" * 32, PORT, relay_up=True),
                ("192.168.2.10", PORT),
            ),
        ]
        self.first_probe: dict[str, float] = {}

    def other(self, n: Node) -> Node:
        return self.nodes[1] if n is self.nodes[0] else self.nodes[0]

    def at(self, t: float, what: object) -> None:
        heapq.heappush(self._queue, (t, next(self._seq), what))

    def carry_out(self, n: Node) -> None:
        peer = self.other(n)
        while (ev := n.core.next_event()) is not None:
            if isinstance(ev, Datagram):
                if ev.ttl is None:
                    self.first_probe.setdefault(n.name, self.now)
                src = n.router.outbound(n.inside, ev.dst, ev.ttl, self.now)
                if src is not None and ev.dst[0] == peer.router.public_ip:
                    self.at(self.now + LINK, ("datagram", peer, src, ev.dst, ev.data))
            elif isinstance(ev, CallPeer):
                msg = ev.message(self.now, WALL + self.now)
                self.at(self.now + self.signal_latency[self.nodes.index(n)], ("signal", peer, n.node_id, msg))
        if n.direct_at is None and n.core.path(peer.info.wg_key).path is PathKind.DIRECT:
            n.direct_at = self.now

    def start(self, n: Node) -> None:
        n.core.start(self.now)
        n.core.set_peers([self.other(n).info], self.now)
        self.carry_out(n)

    def run_until(self, until: float, *, starts: dict[str, float]) -> None:
        for n in self.nodes:
            self.at(starts[n.name], ("start", n))
        while True:
            timers = [t for n in self.nodes if (t := n.core.next_timer()) is not None]
            due = [
                t
                for t in (min(timers, default=None), self._queue[0][0] if self._queue else None)
                if t is not None
            ]
            if not due or min(due) > until:
                break
            self.now = max(self.now, min(due))
            if self._queue and self._queue[0][0] <= self.now:
                _, _, item = heapq.heappop(self._queue)
                assert isinstance(item, tuple)
                if item[0] == "start":
                    self.start(item[1])
                    continue
                if item[0] == "signal":
                    _, dst, src_id, msg = item
                    dst.core.called(src_id, msg, self.now, WALL + self.now)
                else:
                    _, dst, src, to, data = item
                    inside = dst.router.inbound(src, to, self.now)
                    if inside is not None:
                        dst.core.receive([(src, data)], self.now)
                self.carry_out(dst)
                continue
            for n in (n for n in self.nodes if (t := n.core.next_timer()) is not None and t <= self.now):
                n.core.handle_timer(self.now)
                self.carry_out(n)
        self.now = until


def _leader(net: Internet) -> str:
    a, b = net.nodes
    return "a" if disco.DiscoKeys(a.seed).public < disco.DiscoKeys(b.seed).public else "b"


@pytest.mark.parametrize("b_starts", [0.0, 0.3, 0.7, 1.5])
def test_first_probes_that_cannot_cross_still_go_direct_in_the_first_round(b_starts: float) -> None:
    net = Internet()
    net.run_until(60.0, starts={"a": 0.0, "b": b_starts})
    leader = _leader(net)
    assert net.first_probe[leader] < net.first_probe["a" if leader == "b" else "b"], "the leader probes first"
    for n in net.nodes:
        assert n.direct_at is not None, f"{n.name} never went direct"
        # the first attempt (≈ 3 s from the later start), the poison's 30 s, the wait's margins
        assert n.direct_at < b_starts + 3.0 + 32.0 + 3.0, f"{n.name} direct at {n.direct_at:.1f} s"


@pytest.mark.parametrize("late", ["a", "b"])
def test_when_the_follower_probed_first_the_second_round_swaps_roles(late: str) -> None:
    # a call that arrives after the moment it proposes: its receiver probes on arrival, after the caller
    slow = (0.6, 0.05) if late == "b" else (0.05, 0.6)
    net = Internet(signal_latency=slow)
    net.run_until(120.0, starts={"a": 0.0, "b": 0.0})
    for n in net.nodes:
        assert n.direct_at is not None, f"{n.name} never went direct"
        assert n.direct_at < 80.0


@pytest.mark.parametrize("b_starts", [2.5, 12.0, 40.0])
def test_a_peer_that_starts_during_our_round_resynchronises(b_starts: float) -> None:
    # a's first attempt finds nobody: a's round is for nothing; b's call ends it and both attempt together.
    # a's probes moved b's mapping, so the first round after that fails too and the second one works.
    net = Internet()
    net.run_until(b_starts + 90.0, starts={"a": 0.0, "b": b_starts})
    for n in net.nodes:
        assert n.direct_at is not None, f"{n.name} never went direct"
        assert n.direct_at < b_starts + 80.0
