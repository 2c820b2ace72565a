"""meshd's path report (issue 18): the summary of its peers' paths and when it is sent."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as hs

from meshd.nat.strategy import NatInfo
from meshd.pathreport import MAX_PEERS, Debouncer, Facts, PathEntry, Summary, facts_of, summarize
from meshd.status import PeerStatus


def peer(name: str, path: str, transport: str | None = None, ms: float | None = None) -> PeerStatus:
    return PeerStatus(
        name=name,
        ips=("100.64.0.9/32",),
        public_key="k",
        path=path,
        endpoint="192.0.2.1:1" if path == "direct" else None,
        relay="fra" if path == "relay" else None,
        latency_ms=ms,
        relay_transport=transport,
    )


def test_the_summary_names_peers_by_node_id_with_path_transport_and_latency_only() -> None:
    peers = [
        peer("b", "relay", "tcp", 41.26),
        peer("a", "direct", None, 3.0),
        peer("c", "none"),
        peer("x", "direct"),
    ]
    got = summarize(peers, {"a": 7, "b": 3, "c": 9})  # "x" is not in the map any more: left out
    assert got == (
        PathEntry(3, "relay", "tcp", 41.3),
        PathEntry(7, "direct", None, 3.0),
        PathEntry(9, "none", None, None),
    )
    assert got[0].to_json() == {"node": 3, "path": "relay", "relay_transport": "tcp", "latency_ms": 41.3}
    assert "192.0.2.1" not in repr(got)  # no endpoints leave the node


def test_the_summary_is_bounded() -> None:
    peers = [peer(f"p{i}", "direct") for i in range(MAX_PEERS + 10)]
    assert len(summarize(peers, {f"p{i}": i + 1 for i in range(MAX_PEERS + 10)})) == MAX_PEERS


def test_the_largest_report_fits_the_coordinators_body_limit() -> None:
    worst = [PathEntry(10**9 + i, "relay", "peer", 599_999.9) for i in range(MAX_PEERS)]
    assert len(json.dumps({"peers": [e.to_json() for e in worst]})) < 64 * 1024


def s(*entries: PathEntry) -> Summary:
    return tuple(entries)


def test_a_change_is_sent_at_once_then_at_most_once_per_interval() -> None:
    d = Debouncer(interval=5.0)
    first = s(PathEntry(2, "relay", "udp", 40.0))
    assert d.due(first, 100.0) == first
    d.delivered(first)
    assert d.due(first, 100.5) is None  # unchanged
    direct = s(PathEntry(2, "direct", None, 4.0))
    assert d.due(direct, 101.0) is None  # changed, but too soon after the last report
    flap = s(PathEntry(2, "relay", "tcp", 40.0))
    assert d.due(flap, 103.0) is None
    assert d.due(flap, 105.0) == flap  # the latest state once the interval is over: flaps are merged
    d.delivered(flap)
    assert d.due(flap, 200.0) is None  # nothing new: nothing sent, however long it has been


def test_jitter_within_a_half_octave_sends_nothing_but_a_real_change_does() -> None:
    d = Debouncer(interval=5.0)
    d.delivered(s(PathEntry(2, "direct", None, 20.0)))
    assert d.due(s(PathEntry(2, "direct", None, 21.5)), 0.0) is None
    assert d.due(s(PathEntry(2, "direct", None, 80.0)), 0.0) is not None


def test_a_failed_report_is_retried_after_the_interval() -> None:
    d = Debouncer(interval=5.0)
    summary = s(PathEntry(2, "direct", None, 1.0))
    assert d.due(summary, 10.0) == summary  # ... and the PUT failed: not delivered
    assert d.due(summary, 12.0) is None
    assert d.due(summary, 15.0) == summary


@given(hs.lists(hs.tuples(hs.floats(0, 1000), hs.sampled_from(["direct", "relay", "none"])), max_size=60))
def test_never_two_reports_within_the_interval(changes: list[tuple[float, str]]) -> None:
    d = Debouncer(interval=5.0)
    sent: list[float] = []
    for now, path in sorted(changes):
        due = d.due(s(PathEntry(1, path)), now)
        if due is not None:
            sent.append(now)
            d.delivered(due)
    assert all(b - a >= 5.0 for a, b in itertools.pairwise(sent))


STUN_A, STUN_B = ("198.51.100.1", 3478), ("198.51.100.1", 3479)


def test_the_facts_are_netchecks_udp_mapping_and_active_port_map() -> None:
    assert facts_of(None) is None  # no path strategy yet
    assert facts_of(NatInfo()) is None  # nothing asked or answered yet: nothing to tell
    edm = NatInfo(reflexive={STUN_A: ("203.0.113.5", 1000), STUN_B: ("203.0.113.5", 1001)})
    assert facts_of(edm) == Facts(udp=True, mapping="EDM", portmap=None)
    eim = NatInfo(
        reflexive={STUN_A: ("203.0.113.5", 1000), STUN_B: ("203.0.113.5", 1000)},
        portmap="natpmp",
        portmapped=("203.0.113.5", 41641),
    )
    assert facts_of(eim) == Facts(udp=True, mapping="EIM", portmap="natpmp")
    one = NatInfo(reflexive={STUN_A: ("203.0.113.5", 1000)})
    assert facts_of(one) == Facts(udp=True, mapping=None)  # one answer cannot tell the mapping
    # STUN went unanswered and nothing ever answered: UDP is blocked
    assert facts_of(NatInfo(stun_unanswered=True)) == Facts(udp=False, mapping=None)
    # one server unanswered but another answered: UDP works
    assert facts_of(NatInfo(reflexive=dict(one.reflexive), stun_unanswered=True)) == Facts(True, None)
    assert Facts(False, None).to_json() == {"udp": False, "mapping": None, "portmap": None}


def test_a_change_of_facts_alone_is_a_change_for_the_debouncer() -> None:
    d = Debouncer(interval=5.0)
    same = s(PathEntry(2, "relay", "tcp", 40.0))
    assert d.due(same, 0.0, None) == same
    d.delivered(same, None)
    assert d.due(same, 10.0, None) is None
    blocked = Facts(udp=False, mapping=None)
    assert d.due(same, 10.0, blocked) == same  # netcheck learnt something: the coordinator should know
    d.delivered(same, blocked)
    assert d.due(same, 11.0, Facts(udp=False, mapping=None)) is None  # equal facts: nothing new
    assert d.due(same, 12.0, Facts(udp=True, mapping="EDM")) is None  # new, but within the interval
    assert d.due(same, 15.0, Facts(udp=True, mapping="EDM")) == same
