"""Two TraversalCores on an in-memory Internet with a virtual clock: what the sans-IO engine decides.

Each node sits behind a NAT that filters by destination (a datagram from X gets in only once the node
sent to X): the first probes go direct only if both sides send them at about the same moment, which is
what the call-me-maybe timing is for.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
from dataclasses import dataclass, field

from pytest import approx

from meshd.nat.core import Announce, CallPeer, Datagram, Decided, TraversalCore
from meshd.nat.probes import Answered, Probes
from meshd.nat.punch import FOLLOW_LAG
from meshd.nat.strategy import PeerInfo
from meshd.paths import PathKind, UseDirect, UseRelay
from meshd.proto import disco
from meshd.proto.cmm import CallMeMaybe
from meshd.proto.endpoint import Endpoint

WALL = 1_767_225_600.0
LATENCY = 0.02  #: one way, between the two NATs
SIGNAL_LATENCY = 0.05  #: through the coordinator


@dataclass
class Node:
    name: str
    node_id: int
    seed: bytes
    addr: Endpoint  #: its public (NAT) address
    core: TraversalCore
    opened: set[Endpoint] = field(default_factory=set)  #: destinations it sent to (NAT filter state)
    dropped: int = 0
    decisions: list[tuple[float, UseDirect | UseRelay]] = field(default_factory=list)
    announced: list[list[str]] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)
    first_probe: float | None = None

    @property
    def info(self) -> PeerInfo:
        node_key = disco.DiscoKeys(self.seed).public
        return PeerInfo(self.name, self.node_id, f"wg-{self.name}", node_key, (self.addr,))


class Internet:
    def __init__(self, *, filtering: bool = True, signals: bool = True, relay_up: bool = True) -> None:
        self.now = 0.0
        self.filtering = filtering
        self.signals = signals
        self._queue: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self.nodes = [
            Node("a", 1, b"a" * 32, ("6.0.0.1", 41641), TraversalCore(b"a" * 32, 41641, relay_up=relay_up)),
            Node("b", 2, b"b" * 32, ("6.0.0.2", 41641), TraversalCore(b"b" * 32, 41641, relay_up=relay_up)),
        ]

    def other(self, n: Node) -> Node:
        return self.nodes[1] if n is self.nodes[0] else self.nodes[0]

    def at(self, t: float, what: object) -> None:
        heapq.heappush(self._queue, (t, next(self._seq), what))

    def carry_out(self, n: Node) -> None:
        while (ev := n.core.next_event()) is not None:
            peer = self.other(n)
            if isinstance(ev, Datagram):
                if n.first_probe is None and disco.looks_like_disco(ev.data):
                    n.first_probe = self.now
                n.opened.add(ev.dst)
                if ev.dst == peer.addr:
                    self.at(self.now + LATENCY, ("datagram", peer, n.addr, ev.data))
            elif isinstance(ev, CallPeer):
                n.calls.append(self.now)
                msg = ev.message(self.now, WALL + self.now)
                if self.signals:
                    self.at(self.now + SIGNAL_LATENCY, ("signal", peer, n.node_id, msg))
            elif isinstance(ev, Decided):
                n.decisions.append((self.now, ev.decision))
            elif isinstance(ev, Announce):
                n.announced.append(ev.candidates)

    def start(self, *nodes: Node) -> None:
        for n in nodes or self.nodes:
            n.core.start(self.now)
            n.core.set_peers([self.other(n).info], self.now)
            self.carry_out(n)

    def run_until(self, until: float) -> None:
        while True:
            timers = [(t, n) for n in self.nodes if (t := n.core.next_timer()) is not None]
            next_timer = min(timers, key=lambda x: x[0]) if timers else None
            next_msg = self._queue[0][0] if self._queue else None
            candidates = [t for t in (next_timer and next_timer[0], next_msg) if t is not None]
            if not candidates or min(candidates) > until:
                break
            self.now = max(self.now, min(candidates))
            if next_msg is not None and next_msg <= self.now:
                _, _, item = heapq.heappop(self._queue)
                assert isinstance(item, tuple)
                kind, dst, src, payload = item
                if kind == "datagram":
                    if self.filtering and src not in dst.opened:
                        dst.dropped += 1
                    else:
                        dst.core.receive([(src, payload)], self.now)
                else:
                    dst.core.called(src, payload, self.now, WALL + self.now)
                self.carry_out(dst)
            else:
                for n in self.nodes:
                    t = n.core.next_timer()
                    if t is not None and t <= self.now:
                        n.core.handle_timer(self.now)
                        self.carry_out(n)
        self.now = until


def test_two_filtered_nats_go_direct_because_both_sides_probe_at_the_agreed_moment() -> None:
    net = Internet()
    a, b = net.nodes
    net.start()
    net.run_until(1.9)
    assert a.first_probe is None and b.first_probe is None, "no probes before our addresses are known"
    net.run_until(6.0)
    for n, peer in ((a, b), (b, a)):
        assert n.core.path(peer.info.wg_key).path is PathKind.DIRECT
        assert n.core.path(peer.info.wg_key).endpoint == peer.addr
        assert isinstance(n.decisions[-1][1], UseDirect)
    assert a.first_probe is not None and b.first_probe is not None
    assert abs(a.first_probe - b.first_probe) < LATENCY, "the first probes cross between the NATs"
    assert len(a.calls) + len(b.calls) >= 1


def test_nodes_started_apart_still_probe_together_and_no_probe_is_lost() -> None:
    net = Internet()
    a, b = net.nodes
    net.start(a)
    net.run_until(0.7)
    net.start(b)
    net.run_until(6.0)
    assert a.core.path(b.info.wg_key).path is PathKind.DIRECT
    assert b.core.path(a.info.wg_key).path is PathKind.DIRECT
    assert a.first_probe is not None and b.first_probe is not None
    # the moment a proposed; the follower (higher node key) FOLLOW_LAG later
    assert sorted([a.first_probe, b.first_probe]) == [approx(2.25), approx(2.25 + FOLLOW_LAG)]
    assert a.dropped == b.dropped == 0


def test_without_the_call_the_first_probes_hit_a_closed_nat() -> None:
    # the same, but the coordinator loses every signal: the lab's NAT filter is real
    net = Internet(signals=False)
    a, b = net.nodes
    net.start(a)
    net.run_until(0.7)
    net.start(b)
    net.run_until(6.0)
    assert b.dropped > 0


def test_a_new_peer_reports_none_while_the_relay_is_down_and_relay_once_it_is_up() -> None:
    net = Internet(relay_up=False)
    a, b = net.nodes
    a.core.set_peers([b.info], 0.0)
    assert a.core.path(b.info.wg_key).path is PathKind.NONE
    a.core.relay_changed(True, 0.1)
    assert a.core.path(b.info.wg_key).path is PathKind.RELAY
    a.core.relay_changed(False, 0.2)
    assert a.core.path(b.info.wg_key).path is PathKind.NONE
    assert a.core.path("wg-unknown").path is PathKind.NONE


def test_probes_wait_for_start_and_the_first_decision_is_the_relay() -> None:
    net = Internet()
    a, b = net.nodes
    a.core.set_peers([b.info], 0.0)
    net.carry_out(a)
    assert a.decisions == [(0.0, UseRelay(b.info.wg_key, "start"))]
    assert a.first_probe is None and a.core.next_event() is None


def test_our_candidates_are_announced_when_they_change() -> None:
    net = Internet()
    a = net.nodes[0]
    a.core.set_local({"eth0/192.168.1.5": ipaddress.ip_network("192.168.1.0/24")}, 0.0)
    a.core.set_local({"eth0/192.168.1.5": ipaddress.ip_network("192.168.1.0/24")}, 0.1)
    net.carry_out(a)
    assert a.announced == [["192.168.1.5:41641"]]
    a.core.set_portmap("pcp", ("6.0.0.1", 50000), 0.2)
    net.carry_out(a)
    assert a.announced[-1] == ["192.168.1.5:41641", "6.0.0.1:50000"]
    assert a.core.nat.portmap == "pcp"


def test_a_signal_from_a_stranger_changes_nothing() -> None:
    net = Internet()
    a = net.nodes[0]
    net.start()
    a.core.called(99, CallMeMaybe((("6.6.6.6", 1),), WALL), 0.0, WALL)
    net.carry_out(a)
    assert a.calls == [] and a.first_probe is None


def test_pending_probe_ids_are_capped_and_expire() -> None:
    peer = disco.DiscoKeys(b"p" * 32)
    probes = Probes(b"a" * 32, max_pending=3)
    sent = [probes.ping("wg-p", peer.public, ("6.0.0.2", 1000 + i), 0.0) for i in range(5)]
    assert probes.pending == 3
    me = disco.DiscoKeys(b"a" * 32).public

    def answer(data: bytes) -> bytes:
        ping = peer.open(data, me)
        return peer.seal(me, disco.Pong(ping.txid, ("6.0.0.1", 41641)))

    peers = {peer.public: "wg-p"}
    assert probes.receive(answer(sent[0]), ("6.0.0.2", 1000), peers, 0.1) is None, "the oldest went"
    got = probes.receive(answer(sent[4]), ("6.0.0.2", 1004), peers, 0.1)
    assert isinstance(got, Answered) and got.sent_to == ("6.0.0.2", 1004) and got.rtt == 0.1
    probes.expire(10.0)
    assert probes.pending == 0


def test_peers_on_our_lan_go_direct_at_once_without_waiting_for_stun_or_a_moment() -> None:
    """Issue 15 (same LAN ≤ 0.5 s): a probe to an address on one of our own networks passes no router,
    so it leaves before our STUN answers (GATHER_TIMEOUT away here: no servers answer) and without a
    call-me-maybe; the two probes are answered one round trip later."""
    net = Internet(filtering=False)
    a, b = net.nodes
    a.addr, b.addr = ("192.168.1.10", 41641), ("192.168.1.20", 41641)
    lan = {"eth0/192.168.1.{}": ipaddress.ip_network("192.168.1.0/24")}
    for n in (a, b):
        n.core.set_local({k.format(n.addr[0].rsplit(".", 1)[1]): v for k, v in lan.items()}, 0.0)
        n.core.set_stun_servers([("7.0.0.1", 3478)], 0.0)  # asked, never answers within the test
    net.start()
    net.run_until(0.2)
    assert a.first_probe == 0.0 and b.first_probe == 0.0
    for n, peer in ((a, b), (b, a)):
        assert n.core.path(peer.info.wg_key).path is PathKind.DIRECT
        assert n.core.path(peer.info.wg_key).endpoint == peer.addr
        assert n.decisions[-1][0] <= 2 * LATENCY + 1e-9
    assert a.calls == b.calls == []


def test_public_candidates_still_wait_for_our_stun_answers() -> None:
    net = Internet()
    a, b = net.nodes
    a.core.set_local({"eth0/192.168.1.10": ipaddress.ip_network("192.168.1.0/24")}, 0.0)
    a.core.set_stun_servers([("7.0.0.1", 3478)], 0.0)
    net.carry_out(a)
    first = a.first_probe  # STUN is no probe
    a.core.start(0.0)
    a.core.set_peers([b.info], 0.0)
    net.carry_out(a)
    assert first is None and a.first_probe is None, "b's public address: held until gathered"
