"""Candidate gathering over IPv4 and IPv6 (issue 15): which of our addresses a peer hears, which of a
peer's addresses we probe, and STUN over IPv6 kept apart from the IPv4 NAT's mapping."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from meshd.nat.gather import Gatherer, ipv6_scope
from meshd.nat.strategy import NatInfo, Network
from meshd.paths import Candidate, CandidateKind
from meshd.proto import stun

PORT = 41641
V4 = ("6.0.0.9", 3478)
V6 = ("2001:db8:ffff::1", 3478)


def nets(*ifaddrs: str) -> dict[str, Network]:
    """``"eth0/2001:db8:1::10/64"`` -> the ``{"ifname/addr": network}`` localnet gives."""
    out: dict[str, Network] = {}
    for text in ifaddrs:
        name, addr, plen = text.split("/")
        out[f"{name}/{addr}"] = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    return out


HOME = nets(
    "eth0/192.168.1.10/24",
    "eth0/2001:db8:1::10/64",  # global (documentation prefix: global unicast in the lab)
    "eth0/fd12:3456:789a::10/64",  # unique local
    "eth0/fec0::10/64",  # site-local: deprecated, never
)


def gatherer() -> Gatherer:
    g = Gatherer(PORT, NatInfo())
    g.set_local(HOME)
    return g


def test_scopes() -> None:
    assert ipv6_scope("2001:db8::1") == "global"
    assert ipv6_scope("2a00:1450::1") == "global"
    assert ipv6_scope("fd00::1") == "ula"
    for never in ("fe80::1", "::1", "::", "ff02::1", "::ffff:6.0.0.1", "fec0::1", "6.0.0.1", "fe80::1%eth0"):
        assert ipv6_scope(never) is None, never


@given(st.text(max_size=60))
def test_scope_of_any_text_is_known_or_none(text: str) -> None:
    assert ipv6_scope(text) in ("global", "ula", None)


@given(st.ip_addresses(v=6))
def test_scope_of_any_ipv6_address(ip: ipaddress.IPv6Address) -> None:
    scope = ipv6_scope(str(ip))
    if ip.is_link_local or ip.is_loopback or ip.is_multicast or ip.ipv4_mapped is not None:
        assert scope is None
    if scope == "ula":
        assert ip in ipaddress.IPv6Network("fc00::/7")


def test_our_candidates_are_ipv4_first_then_global_ipv6_then_ula() -> None:
    g = gatherer()
    g.nat.reflexive[V4] = ("6.0.0.2", PORT)
    assert g.candidates() == [
        ("192.168.1.10", PORT),
        ("6.0.0.2", PORT),
        ("2001:db8:1::10", PORT),
        ("fd12:3456:789a::10", PORT),
    ]


def test_a_peers_ula_counts_only_on_our_segment_and_other_scopes_never() -> None:
    g = gatherer()
    got = g.classify(
        [
            ("2001:db8:2::20", PORT),  # global, elsewhere
            ("2001:db8:1::20", PORT),  # global, on our segment
            ("fd12:3456:789a::20", PORT),  # ULA on our segment
            ("fd99::20", PORT),  # ULA elsewhere: somebody else's network (or a mesh overlay)
            ("fe80::20", PORT),
            ("::ffff:6.0.0.3", PORT),
            ("6.0.0.3", PORT),
        ]
    )
    assert got == [
        Candidate(("2001:db8:2::20", PORT), CandidateKind.PUBLIC),
        Candidate(("2001:db8:1::20", PORT), CandidateKind.LAN),
        Candidate(("fd12:3456:789a::20", PORT), CandidateKind.LAN),
        Candidate(("6.0.0.3", PORT), CandidateKind.PUBLIC),
    ]


def answer_all(g: Gatherer, seen: dict[tuple[str, int], tuple[str, int]], now: float) -> None:
    """Play the STUN servers: answer every request ``g`` sends with the mapping in ``seen``."""
    for data, dst in g.datagrams_to_send(now):
        if dst in seen:
            reply = stun.answer(data, seen[dst])
            assert reply is not None
            g.receive(reply, dst, now)


def test_ipv6_stun_adds_a_candidate_but_is_not_the_nat_mapping() -> None:
    g = gatherer()
    g.set_servers([V4, V6], 0.0)
    answer_all(g, {V4: ("6.0.0.2", 1234), V6: ("2001:db8:1::99", PORT)}, 0.0)
    assert g.results()
    assert g.nat.reflexive == {V4: ("6.0.0.2", 1234)}
    assert g.nat.mapping_varies_by_dest is None  # one IPv4 server: the IPv6 answer is not compared
    assert g.reflexive6 == {V6: ("2001:db8:1::99", PORT)}
    assert ("2001:db8:1::99", PORT) in g.candidates()


def test_unanswered_ipv6_stun_is_not_blocked_udp_and_does_not_hold_punching() -> None:
    g = gatherer()
    g.set_servers([V4, V6], 0.0)
    answer_all(g, {V4: ("6.0.0.2", PORT)}, 0.0)
    g.results()
    assert g.idle  # IPv4 answered: punching need not wait for IPv6
    now = 0.0
    while (t := g.next_timer()) is not None and now < 60:
        now = t
        g.handle_timer(now)
        g.datagrams_to_send(now)
    g.results()
    assert not g.nat.stun_unanswered
    assert g.reflexive6 == {}


def test_ipv6_servers_are_not_asked_without_a_global_ipv6_address() -> None:
    g = Gatherer(PORT, NatInfo())
    g.set_local(nets("eth0/192.168.1.10/24", "eth0/fd00::10/64"))
    g.set_servers([V4, V6], 0.0)
    assert [dst for _, dst in g.datagrams_to_send(0.0)] == [V4]


@given(st.binary(max_size=80))
def test_raw_ipv6_datagram_parser_never_raises(data: bytes) -> None:
    from meshd.nat.rawport import parse_udp6

    got = parse_udp6(data)
    if got is not None:
        sport, dport, payload = got
        assert data[:2] == sport.to_bytes(2, "big") and data[2:4] == dport.to_bytes(2, "big")
        assert len(payload) <= len(data) - 8


def test_raw_ipv6_datagram_round_trip() -> None:
    from meshd.nat.rawport import build_udp, parse_udp6

    seg = build_udp(PORT, ("2001:db8::2", 3478), b"hello")
    assert parse_udp6(seg) == (PORT, 3478, b"hello")
    assert parse_udp6(seg + b"trailing") == (PORT, 3478, b"hello")  # the UDP length bounds the payload
