"""A peer's netcheck facts in the map (issue 15, ``f``): compact, strict on values, additive."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import netmap
from meshd.proto.netmap import NetMap, NetmapError, Peer, PeerNat
from meshd.proto.policy import ALLOW_ALL

nats = st.none() | st.builds(
    PeerNat,
    udp=st.none() | st.booleans(),
    mapping=st.none() | st.sampled_from(netmap.NAT_MAPPINGS),
    portmap=st.none() | st.sampled_from(netmap.NAT_PORTMAPS),
)


def peer(node_id: int, nat: PeerNat | None = None) -> Peer:
    return Peer(node_id, f"n{node_id}", ("100.64.0.1/32",), "wg", "np", "cert", nat=nat)


def a_map(version: int, *peers: Peer) -> NetMap:
    return NetMap(version, peer(0), peers, (), "", "mesh", ALLOW_ALL)


@given(nats, nats)
def test_maps_and_deltas_with_facts_survive_the_codec(before: PeerNat | None, after: PeerNat | None) -> None:
    old, new = a_map(1, peer(1, before), peer(2)), a_map(2, peer(1, after), peer(2, after))
    for m in (old, new):
        text = netmap.encode_server_message(netmap.MapMessage(m))
        assert netmap.decode_server_message(text) == netmap.MapMessage(m)
    d = netmap.diff(old, new)
    assert netmap.apply(old, d) == new
    text = netmap.encode_server_message(netmap.DeltaMessage(d))
    assert netmap.decode_server_message(text) == netmap.DeltaMessage(d)


def test_a_peer_without_facts_keeps_its_bytes_and_known_facts_are_compact() -> None:
    assert "f" not in netmap.peer_to_json(peer(1))
    doc = netmap.peer_to_json(peer(1, PeerNat(udp=True, mapping="EDM")))
    assert doc["f"] == {"udp": True, "mapping": "EDM"}  # unknown (portmap) left out
    public = netmap.peer_to_json(peer(1, PeerNat(udp=True, mapping="none")))
    assert netmap.peer_from_json(public).nat == PeerNat(True, "none", None)


def test_a_change_of_facts_reaches_peers_as_a_changed_peer() -> None:
    old = a_map(1, peer(1))
    new = a_map(2, peer(1, PeerNat(udp=False)))
    d = netmap.diff(old, new)
    assert d.peers_changed == (peer(1, PeerNat(udp=False)),) and not d.endpoints_changed


@pytest.mark.parametrize(
    "nat",
    [
        [],
        "EDM",
        {"udp": "yes"},
        {"udp": 1},
        {"mapping": "eim"},
        {"mapping": "public"},
        {"portmap": "upnp2"},
        {"portmap": True},
    ],
)
def test_bad_facts_are_refused_with_netmap_error(nat: object) -> None:
    doc = {**netmap.peer_to_json(peer(1)), "f": nat}
    with pytest.raises(NetmapError, match="nat"):
        netmap.peer_from_json(json.loads(json.dumps(doc)))


def test_facts_a_later_coordinator_adds_are_ignored() -> None:
    doc = {**netmap.peer_to_json(peer(1)), "f": {"udp": True, "filtering": "APDF"}}
    assert netmap.peer_from_json(doc) == replace(peer(1), nat=PeerNat(udp=True))
