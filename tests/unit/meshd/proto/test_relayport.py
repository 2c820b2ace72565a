"""UDP relay ports (issue 14): the wire formats and both sides' state machines, driven against each other."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import relayport as rp
from meshd.proto.relayport import Allocations, PortClient, PortFlags, Refused

A, B, C = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
ADDR_A, ADDR_B, ADDR_C = ("10.0.0.1", 41641), ("10.0.0.2", 41641), ("10.0.0.3", 41641)


def _counter_secret() -> object:
    n = itertools.count(1)
    return lambda size: bytes([next(n) % 256]) * size


# -- wire formats -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first", [1, 2, 3, 4])
def test_wireguard_messages_are_told_from_binds(first: int) -> None:
    wg = bytes([first, 0, 0, 0]) + b"x" * 28
    assert rp.is_wireguard(wg) and not rp.looks_like_bind(wg)
    bind = rp.encode_bind(b"s" * 16, 40000, 1)
    assert rp.looks_like_bind(bind) and not rp.is_wireguard(bind)


def test_bind_round_trip_and_mac() -> None:
    data = rp.encode_bind(b"s" * 16, 40001, 7)
    b = rp.decode_bind(data)
    assert (b.port, b.counter) == (40001, 7)
    assert rp.bind_valid(b"s" * 16, data, b)
    assert not rp.bind_valid(b"t" * 16, data, b)
    forged = data[:5] + (40002).to_bytes(2, "big") + data[7:]  # another port, same MAC
    assert not rp.bind_valid(b"s" * 16, forged, rp.decode_bind(forged))


def test_grant_and_state_round_trip() -> None:
    g = rp.Grant(A, 40000, b"k" * 16, 60)
    assert rp.decode_grant(rp.encode_grant(g)) == g
    assert rp.decode_state(rp.encode_state(B, PortFlags.READY)) == (B, PortFlags.READY)
    assert rp.decode_request(rp.encode_request(C)) == C


@given(st.binary(max_size=80))
def test_any_bytes_never_raise_anything_but_relayporterror(data: bytes) -> None:
    for decode in (rp.decode_bind, rp.decode_grant, rp.decode_state, rp.decode_request):
        with contextlib.suppress(rp.RelayPortError):
            decode(data)
    rp.is_wireguard(data)
    rp.looks_like_bind(data)


@given(st.binary(min_size=16, max_size=16), st.integers(1, 65535), st.integers(0, 2**64 - 1))
def test_bind_round_trips(secret: bytes, port: int, counter: int) -> None:
    data = rp.encode_bind(secret, port, counter)
    b = rp.decode_bind(data)
    assert (b.port, b.counter) == (port, counter) and rp.bind_valid(secret, data, b)


@given(st.binary(min_size=rp.BIND_LEN, max_size=rp.BIND_LEN))
def test_random_binds_are_refused_by_the_relay(data: bytes) -> None:
    allocs, _ = _pair()
    port = allocs.by_pair[frozenset((A, B))].a.port
    assert not allocs.bind(port, ADDR_C, data, 1.0)


# -- the relay's allocations -------------------------------------------------------------------------------
def _pair(**kw: object) -> tuple[Allocations, list[rp.PortEvent]]:
    allocs = Allocations(range(40000, 40010), random=_counter_secret(), **kw)  # type: ignore[arg-type]
    allocs.request(A, 1, B, 0.0)
    assert allocs.events() == []  # one side alone gets nothing: the peer must ask too
    allocs.request(B, 2, A, 0.1)
    return allocs, allocs.events()


def _grants(events: list[rp.PortEvent]) -> dict[bytes, rp.Grant]:
    return {e.to: e.grant for e in events if isinstance(e, rp.SendGrant)}


def test_a_mutual_request_makes_one_port_per_side() -> None:
    _, events = _pair()
    grants = _grants(events)
    assert set(grants) == {A, B}
    assert grants[A].peer == B and grants[B].peer == A
    assert grants[A].port != grants[B].port and grants[A].secret != grants[B].secret
    assert any(isinstance(e, rp.Opened) for e in events)


def test_binds_need_the_sides_secret_and_a_growing_counter() -> None:
    allocs, events = _pair()
    g = _grants(events)
    pa = g[A].port
    assert not allocs.bind(pa, ADDR_C, rp.encode_bind(g[B].secret, pa, 1), 1.0)  # B's secret on A's port
    assert not allocs.bind(pa, ADDR_C, rp.encode_bind(b"x" * 16, pa, 1), 1.0)  # no secret
    good = rp.encode_bind(g[A].secret, pa, 5)
    assert allocs.bind(pa, ADDR_A, good, 1.0)
    assert not allocs.bind(pa, ADDR_C, good, 1.1)  # a captured bind replayed from elsewhere
    assert allocs.by_port[pa].addr == ADDR_A
    states = [e for e in allocs.events() if isinstance(e, rp.SendState)]
    assert (
        rp.SendState(A, B, PortFlags.SELF_BOUND) in states
        and rp.SendState(B, A, PortFlags.PEER_BOUND) in states
    )
    assert allocs.bind(g[B].port, ADDR_B, rp.encode_bind(g[B].secret, g[B].port, 1), 1.2)
    states = [e for e in allocs.events() if isinstance(e, rp.SendState)]
    assert rp.SendState(A, B, PortFlags.READY) in states and rp.SendState(B, A, PortFlags.READY) in states


def test_a_rebinding_moves_the_side_and_tells_the_fast_path() -> None:
    allocs, events = _pair()
    g = _grants(events)
    pa = g[A].port
    assert allocs.bind(pa, ADDR_A, rp.encode_bind(g[A].secret, pa, 1), 1.0)
    allocs.events()
    assert allocs.bind(pa, ("10.0.0.1", 50000), rp.encode_bind(g[A].secret, pa, 2), 2.0)
    assert allocs.by_port[pa].addr == ("10.0.0.1", 50000)
    assert any(isinstance(e, rp.Bound) for e in allocs.events())


def test_policy_refusal_caps_and_self_pairs() -> None:
    allocs = Allocations(range(40000, 40010), may_talk=lambda a, b: False)
    allocs.request(A, 1, B, 0.0)
    with pytest.raises(Refused, match="policy"):
        allocs.request(B, 2, A, 0.0)
    with pytest.raises(Refused):
        allocs.request(A, 1, A, 0.0)
    capped = Allocations(range(40000, 40100), per_node=1)
    for peer in (B, C):
        capped.request(A, 1, peer, 0.0)
    capped.request(B, 2, A, 0.0)
    with pytest.raises(Refused, match="1 relay port"):
        capped.request(C, 3, A, 0.0)
    full = Allocations(range(40000, 40002))
    full.request(A, 1, B, 0.0)
    full.request(B, 2, A, 0.0)
    full.request(A, 1, C, 0.0)
    with pytest.raises(Refused, match="free"):
        full.request(C, 3, A, 0.0)


def test_idle_allocations_expire_and_traffic_keeps_them() -> None:
    allocs, events = _pair(idle=10.0)
    g = _grants(events)
    allocs.expire(5.0)
    allocs.by_port[g[A].port].packets += 3  # forwarded packets count as activity
    allocs.expire(12.0)
    assert allocs.by_pair
    allocs.expire(23.0)
    assert not allocs.by_pair and not allocs.by_port
    evs = allocs.events()
    assert any(isinstance(e, rp.Ended) and e.reason == "idle" for e in evs)
    assert rp.SendState(A, B, PortFlags.CLOSED) in evs


def test_a_node_leaving_ends_its_allocations() -> None:
    allocs, _ = _pair()
    allocs.node_left(A, "session closed")
    assert not allocs.by_pair and not allocs.per_key


def test_asking_again_rotates_the_secret() -> None:
    allocs, events = _pair()
    old = _grants(events)[A]
    allocs.request(A, 1, B, 1.0)
    new = _grants(allocs.events())[A]
    assert new.port == old.port and new.secret != old.secret
    assert not allocs.bind(old.port, ADDR_A, rp.encode_bind(old.secret, old.port, 9), 2.0)


# -- both sides against each other -------------------------------------------------------------------------
class _Lab:
    """Two PortClients and the relay's Allocations, messages carried at once; binds from fixed addresses."""

    def __init__(self) -> None:
        self.relay = Allocations(range(40000, 40010))
        self.nodes = {A: PortClient(), B: PortClient()}
        self.addr = {A: ADDR_A, B: ADDR_B}
        self.moved: list[tuple[bytes, bytes, int | None]] = []
        self.now = 0.0

    def run(self) -> None:
        for _ in range(10):
            busy = False
            for me, c in self.nodes.items():
                for ev in c.events():
                    busy = True
                    if isinstance(ev, rp.SendRequest):
                        self.relay.request(me, 1 if me == A else 2, ev.peer, self.now)
                    elif isinstance(ev, rp.SendBind):
                        self.relay.bind(ev.port, self.addr[me], ev.data, self.now)
                    else:
                        self.moved.append((me, ev.peer, ev.port))
            for ev in self.relay.events():
                busy = True
                if isinstance(ev, rp.SendGrant):
                    self.nodes[ev.to].granted(ev.grant, self.now)
                elif isinstance(ev, rp.SendState):
                    self.nodes[ev.to].state(ev.peer, ev.flags, self.now)
            if not busy:
                return


def test_two_nodes_get_usable_ports_in_one_exchange() -> None:
    lab = _Lab()
    lab.nodes[A].want(B, True, 0.0)
    lab.nodes[B].want(A, True, 0.0)
    lab.run()
    pa, pb = lab.nodes[A].port(B), lab.nodes[B].port(A)
    assert pa is not None and pb is not None and pa != pb
    assert {(m[0], m[2]) for m in lab.moved} == {(A, pa), (B, pb)}


def test_a_relay_restart_falls_back_to_tcp_and_recovers() -> None:
    lab = _Lab()
    for me, peer in ((A, B), (B, A)):
        lab.nodes[me].want(peer, True, 0.0)
    lab.run()
    lab.relay = Allocations(range(40000, 40010))  # restarted: knows nothing
    for c in lab.nodes.values():
        c.session_lost(1.0)
    lab.run()
    assert lab.nodes[A].port(B) is None and (A, B, None) in lab.moved
    for c in lab.nodes.values():
        c.session_up(2.0)
    lab.run()
    assert lab.nodes[A].port(B) is not None and lab.nodes[B].port(A) is not None


def test_an_ended_allocation_is_asked_for_again_later() -> None:
    lab = _Lab()
    for me, peer in ((A, B), (B, A)):
        lab.nodes[me].want(peer, True, 0.0)
    lab.run()
    lab.relay.expire(0.0)
    lab.relay.expire(rp.IDLE_TIMEOUT + 1)  # nothing forwarded, binds are not carried here: idle
    lab.run()
    assert lab.nodes[A].port(B) is None
    t = lab.nodes[A].next_timer()
    assert t is not None and t <= rp.IDLE_TIMEOUT + 1 + rp.REQUEST_RETRY
    for c in lab.nodes.values():
        c.handle_timer(rp.IDLE_TIMEOUT + 1 + rp.REQUEST_RETRY)
    lab.run()
    assert lab.nodes[A].port(B) is not None


def test_unbound_binds_retry_fast_then_refresh() -> None:
    c = PortClient()
    c.want(B, True, 0.0)
    c.granted(rp.Grant(B, 40000, b"k" * 16, 60), 0.0)
    assert [type(e) for e in c.events()] == [rp.SendRequest, rp.SendBind]
    assert c.next_timer() == rp.BIND_RETRY
    c.state(B, PortFlags.SELF_BOUND, 0.1)
    c.handle_timer(rp.BIND_RETRY)
    assert c.next_timer() == rp.BIND_RETRY + rp.BIND_REFRESH
