"""The path machine with IPv6 candidates (issue 15): IPv6 direct beats the relay, IPv4 direct beats IPv6."""

from __future__ import annotations

from meshd.paths import Candidate, CandidateKind, PathKind, PeerPath, UseDirect

V4 = ("6.0.0.2", 41641)
V6 = ("2001:db8:2::10", 41641)


def path() -> PeerPath:
    p = PeerPath("peer", 0.0, relay_up=True)
    p.set_candidates([Candidate(V4, CandidateKind.PUBLIC), Candidate(V6, CandidateKind.PUBLIC)], 0.0)
    return p


def directs(p: PeerPath) -> list[tuple[str, int]]:
    out = []
    while (ev := p.next_event()) is not None:
        if isinstance(ev, UseDirect):
            out.append(ev.endpoint)
    return out


def test_ipv6_goes_direct_where_ipv4_does_not_answer() -> None:
    p = path()
    p.probe_answered(V6, V6, 0.010, 0.5)
    assert directs(p) == [V6]
    assert p.status.path is PathKind.DIRECT and p.status.endpoint == V6


def test_ipv4_is_kept_when_both_answer_even_if_ipv6_is_faster() -> None:
    p = path()
    p.probe_answered(V4, V4, 0.020, 0.5)
    p.probe_answered(V6, V6, 0.005, 0.5)
    assert directs(p) == [V4]


def test_ipv4_answering_later_takes_over_from_ipv6() -> None:
    p = path()
    p.probe_answered(V6, V6, 0.005, 0.5)
    p.probe_answered(V4, V4, 0.020, 0.6)
    assert directs(p) == [V6, V4]
