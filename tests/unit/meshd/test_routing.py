"""Subnet routes and exit nodes on the meshd side (issue 17): choosing the peer per prefix, the
--advertise-routes parser, the masquerading table, the firewall's routed rules and the wire formats."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd import firewall, forwarding, routing
from meshd import status as mstatus
from meshd.proto import netmap
from meshd.proto.policy import InboundRule, allows_everything, rule_from_json, rule_to_json

A = ("100.64.0.1/32",)
LAN = "10.1.0.0/24"


def test_the_lowest_online_carrier_is_primary_and_an_offline_one_hands_over() -> None:
    both = {3: ([LAN], True), 5: ([LAN], True)}
    assert routing.chosen_routes(both) == {3: (LAN,)}
    assert routing.chosen_routes({3: ([LAN], False), 5: ([LAN], True)}) == {5: (LAN,)}
    assert routing.chosen_routes({3: ([LAN], False), 5: ([LAN], False)}) == {3: (LAN,)}  # none online
    assert routing.primaries({3: ([LAN], False), 5: ([LAN], True)}) == {LAN: 5}


def test_own_prefixes_stay_local_and_exit_routes_go_only_to_the_chosen_exit_node() -> None:
    carriers = {2: ([LAN, "0.0.0.0/0", "::/0"], True), 4: (["0.0.0.0/0", "::/0"], True)}
    assert routing.chosen_routes(carriers, own=[LAN]) == {}
    assert routing.chosen_routes(carriers) == {2: (LAN,)}
    assert routing.chosen_routes(carriers, exit_node=4) == {2: (LAN,), 4: ("0.0.0.0/0", "::/0")}
    assert routing.chosen_routes(carriers, exit_node=9) == {2: (LAN,)}  # not an exit node: nothing


@given(
    st.dictionaries(
        st.integers(1, 50), st.tuples(st.lists(st.sampled_from([LAN, "10.2.0.0/16"])), st.booleans())
    )
)
def test_every_prefix_goes_to_exactly_one_carrier(carriers: dict[int, tuple[list[str], bool]]) -> None:
    chosen = routing.chosen_routes(carriers)
    flat = [p for ps in chosen.values() for p in ps]
    assert sorted(flat) == sorted({p for ps, _ in carriers.values() for p in ps})
    for node_id, prefixes in chosen.items():
        assert all(p in carriers[node_id][0] for p in prefixes)


def test_advertise_routes_parser() -> None:
    assert routing.parse_advertised("10.1.0.0/24, 10.2.0.0/16,,fd00:1::/64") == (
        "10.1.0.0/24",
        "10.2.0.0/16",
        "fd00:1::/64",
    )
    assert routing.parse_advertised("") == ()
    for bad in ("10.1.0.1/24", "10.1.0.0/33", "x", "0.0.0.0/0"):
        with pytest.raises(ValueError):
            routing.parse_advertised(bad)


@given(st.text(max_size=40))
def test_the_parser_only_raises_value_error(text: str) -> None:
    try:
        out = routing.parse_advertised(text)
    except ValueError:
        return
    assert all(str(ipaddress.ip_network(p)) == p for p in out)


def test_masquerading_table() -> None:
    script = forwarding.render("mesh0", [LAN, "fd00:1::/64"], snat=True, exit_node=False)
    assert script is not None
    assert 'iifname "mesh0" oifname != "mesh0" ip daddr { 10.1.0.0/24 } masquerade' in script
    assert 'iifname "mesh0" oifname != "mesh0" ip6 daddr { fd00:1::/64 } masquerade' in script
    assert "table inet meshd_mesh0_nat {" in script
    assert forwarding.render("mesh0", [LAN], snat=False, exit_node=False) is None  # keep sources
    exit_script = forwarding.render("mesh0", ["0.0.0.0/0"], snat=False, exit_node=True)
    assert exit_script is not None and "meta nfproto ipv4 masquerade" in exit_script
    with pytest.raises(firewall.FirewallError):
        forwarding.render('m"0', [LAN], snat=True, exit_node=False)


def test_a_router_firewall_opens_routed_prefixes_per_rule_and_its_own_addresses_only_for_itself() -> None:
    rules = (InboundRule(A, "any", ()), InboundRule(A, "tcp", ((22, 22),), (LAN,)))
    text = firewall.render("mesh0", rules)
    assert "ip saddr { 100.64.0.1/32 } fib daddr type local accept" in text
    assert (
        "ip saddr { 100.64.0.1/32 } ip daddr { 10.1.0.0/24 } meta l4proto tcp tcp dport { 22 } accept" in text
    )
    # an IPv4 destination never pairs with an IPv6 source
    assert "ip6 saddr" not in firewall.render("mesh0", (InboundRule(("fd00::1/128",), "any", (), (LAN,)),))
    # a node that routes (local_only) never lets a rule for itself through to what it forwards
    assert "fib daddr type local" in firewall.render("mesh0", (InboundRule(A),), local_only=True)
    assert "fib daddr type local" not in firewall.render("mesh0", (InboundRule(A),))


def test_routed_rules_and_peer_routes_on_the_wire() -> None:
    rule = InboundRule(A, "tcp", ((22, 22),), (LAN,))
    assert rule_from_json(rule_to_json(rule)) == rule
    assert "dst" not in rule_to_json(InboundRule(A))  # maps without routes keep their bytes
    everything = InboundRule(("0.0.0.0/0", "::/0"), "any", (), (LAN,))
    assert not allows_everything((everything,))
    peer = netmap.Peer(1, "gw", ("100.64.0.1/32",), "k", "n", "c", routes=(LAN, "0.0.0.0/0"))
    assert netmap.peer_from_json(netmap.peer_to_json(peer)) == peer
    assert "r" not in netmap.peer_to_json(netmap.Peer(1, "gw", (), "k", "n", "c"))
    for bad in (["10.1.0.1/24"], ["nonsense"], [7], "10.1.0.0/24"):
        raw = netmap.peer_to_json(peer) | {"r": bad}
        with pytest.raises(netmap.NetmapError):
            netmap.peer_from_json(raw)


def test_status_carries_routes_and_the_exit_node() -> None:
    doc = mstatus.Status(
        mstatus.SelfStatus(
            "gw",
            A,
            "k",
            "mesh0",
            "userspace",
            routes_advertised=(LAN,),
            routes_approved=(LAN,),
            exit_node="x",
        ),
        mstatus.CoordinatorStatus("http://c", True),
        (mstatus.PeerStatus("p", A, "k", "relay", routes=(LAN,)),),
    ).to_json()
    assert doc["self"]["routes"] == {"advertised": [LAN], "approved": [LAN]}
    assert doc["self"]["exit_node"] == "x" and doc["peers"][0]["routes"] == [LAN]
    back = mstatus.Status.from_json(doc)
    assert back.self_.routes_approved == (LAN,) and back.peers[0].routes == (LAN,)
    del doc["self"]["routes"], doc["peers"][0]["routes"]  # an older meshd's document still reads
    assert mstatus.Status.from_json(doc).self_.routes_advertised == ()


async def test_the_route_service_skips_prefixes_on_our_own_lans_and_picks_the_exit_by_name() -> None:
    from meshd.router import RouteService

    lans = {"eth0/10.1.0.7": ipaddress.ip_network("10.1.0.0/24")}
    service = RouteService("mesh0", exit_node="exit", local_networks=lambda: lans)
    peers = [
        netmap.Peer(2, "gw", ("100.64.0.2/32",), "k2", "n", "c", online=True, routes=(LAN, "10.2.0.0/16")),
        netmap.Peer(3, "exit", ("100.64.0.3/32",), "k3", "n", "c", online=True, routes=("0.0.0.0/0", "::/0")),
    ]
    assert await service.through(peers) == {2: ("10.2.0.0/16",), 3: ("0.0.0.0/0", "::/0")}
    assert service.fwmark == 51820
    service.exit_node = None
    assert await service.through(peers) == {2: ("10.2.0.0/16",)} and service.fwmark == 0
