"""meshd's path report (issue 18): the summary of its peers' paths and when it is sent."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as hs

from meshd.pathreport import MAX_PEERS, Debouncer, PathEntry, Summary, summarize
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
