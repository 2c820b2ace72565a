"""Deltas shared by a view (issue 16): signed once for a view token, accepted only by a node of that view
that the delta leaves alone (meshd.proto.netmap, "Shared deltas")."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from meshd.proto import netmap
from meshd.proto.encoding import canonical_json
from meshd.proto.netmap import Delta, NetMap, Peer, RelayRegion
from meshd.proto.policy import ALLOW_ALL

KEY = SigningKey(bytes(range(32)))
TRUSTED = [bytes(KEY.verify_key)]
ME = 7
VIEW = "0123456789abcdef"
OTHER_VIEW = "fedcba9876543210"


def peer(i: int, name: str = "") -> Peer:
    return Peer(i, name or f"n{i}", (f"100.64.0.{i}/32",), f"wg{i}", f"nk{i}", "c")


def held(view: str = VIEW) -> NetMap:
    """The map node ME holds (from a node-signed message, which carries its view token)."""
    return NetMap(
        3, peer(ME), (peer(1), peer(2)), (RelayRegion(1, "r", "http://r", 3478),), "", "mesh", ALLOW_ALL, view
    )


def shared(d: Delta, view: str = VIEW) -> netmap.DeltaMessage:
    body = canonical_json(netmap.delta_to_json(d)).decode()
    msg = netmap.decode_server_message(netmap.sign_view_body(body, view, KEY))
    assert isinstance(msg, netmap.DeltaMessage) and msg.sig is not None and msg.sig.view == view
    return msg


RENAME_1 = Delta(3, 4, peers_changed=(peer(1, "renamed"),))


def test_a_shared_delta_verifies_for_a_node_of_its_view_and_applies() -> None:
    msg = shared(RENAME_1)
    netmap.verify(msg, ME, TRUSTED, held())
    netmap.check_order(held(), msg)
    after = netmap.apply(held(), msg.delta)
    assert [p.name for p in after.peers] == ["renamed", "n2"] and after.view == VIEW


def test_a_shared_delta_is_refused_by_a_node_of_another_view_or_without_a_map() -> None:
    with pytest.raises(netmap.NetmapError, match="not this node's view"):
        netmap.verify(shared(RENAME_1), ME, TRUSTED, held(OTHER_VIEW))
    with pytest.raises(netmap.NetmapError, match="not this node's view"):
        netmap.verify(shared(RENAME_1), ME, TRUSTED, None)
    with pytest.raises(netmap.NetmapError, match="not this node's view"):
        netmap.verify(shared(RENAME_1), ME, TRUSTED, held(""))


@pytest.mark.parametrize(
    "delta",
    [
        Delta(3, 4, peers_changed=(peer(ME, "me-renamed"),)),
        Delta(3, 4, peers_added=(peer(ME),)),
        Delta(3, 4, peers_removed=(ME,)),
        Delta(3, 4, endpoints_changed=((ME, ("6.6.6.6:1",), True),)),
        Delta(3, 4, self_node=peer(ME, "evil")),
        Delta(3, 4, view=OTHER_VIEW),
    ],
)
def test_a_shared_delta_that_would_change_the_node_itself_is_refused(delta: Delta) -> None:
    """A change to the node comes signed for the node; a shared one naming it was meant for others."""
    with pytest.raises(netmap.NetmapError, match=f"changes node {ME}"):
        netmap.verify(shared(delta), ME, TRUSTED, held())


def test_a_rewritten_view_token_or_body_does_not_verify() -> None:
    raw = json.loads(
        netmap.sign_view_body(canonical_json(netmap.delta_to_json(RENAME_1)).decode(), VIEW, KEY)
    )
    moved = dict(raw, view=OTHER_VIEW)  # the attacker relabels a delta of one view for another
    msg = netmap.decode_server_message(json.dumps(moved))
    assert isinstance(msg, netmap.DeltaMessage)
    with pytest.raises(netmap.NetmapError, match="does not verify"):
        netmap.verify(msg, ME, TRUSTED, held(OTHER_VIEW))
    raw["delta"]["peers_changed"][0]["endpoints"] = ["6.6.6.6:1"]
    msg = netmap.decode_server_message(json.dumps(raw))
    assert isinstance(msg, netmap.DeltaMessage)
    with pytest.raises(netmap.NetmapError, match="does not verify"):
        netmap.verify(msg, ME, TRUSTED, held())


def test_a_full_map_is_never_accepted_as_signed_for_a_view() -> None:
    body = canonical_json(netmap.map_to_json(held())).decode()
    text = netmap.sign_view_body(body, VIEW, KEY).replace('"type":"delta","delta"', '"type":"map","map"')
    msg = netmap.decode_server_message(text)
    assert isinstance(msg, netmap.MapMessage)
    with pytest.raises(netmap.NetmapError, match="never for a view"):
        netmap.verify(msg, ME, TRUSTED, held())


def test_a_node_signed_message_is_not_accepted_as_a_view_one() -> None:
    """A delta signed for node ME, relabelled as shared by ME's view, does not verify."""
    text = netmap.encode_signed(netmap.DeltaMessage(RENAME_1), ME, KEY)
    msg = netmap.decode_server_message(text.replace('"sig"', f'"view":"{VIEW}","sig"'))
    assert isinstance(msg, netmap.DeltaMessage)
    with pytest.raises(netmap.NetmapError, match="does not verify"):
        netmap.verify(msg, ME, TRUSTED, held())


@given(st.text(max_size=20) | st.integers() | st.none() | st.lists(st.integers(), max_size=2))
def test_any_view_value_raises_only_netmap_error(value: object) -> None:
    raw = json.loads(
        netmap.sign_view_body(canonical_json(netmap.delta_to_json(RENAME_1)).decode(), VIEW, KEY)
    )
    for where in ("envelope", "delta", "map"):
        o = dict(raw)
        if where == "envelope":
            o["view"] = value
        elif where == "delta":
            o["delta"] = dict(o["delta"], view=value)
        else:
            o = {"type": "map", "map": dict(netmap.map_to_json(held()), view=value)}
        try:
            msg = netmap.decode_server_message(json.dumps(o))
        except netmap.NetmapError:
            continue
        assert isinstance(msg, netmap.MapMessage | netmap.DeltaMessage)
        if isinstance(msg, netmap.MapMessage):
            assert msg.map.view == value
        with pytest.raises(netmap.NetmapError):
            netmap.verify(msg, ME, TRUSTED, held(OTHER_VIEW))


def test_a_view_token_round_trips_in_maps_and_deltas() -> None:
    m = held()
    assert netmap.map_from_json(json.loads(json.dumps(netmap.map_to_json(m)))) == m
    new = replace(m, view=OTHER_VIEW)
    d = netmap.diff(m, new)
    assert d.view == OTHER_VIEW and netmap.apply(m, d) == new
    assert netmap.delta_from_json(netmap.delta_to_json(d)) == d
    assert netmap.diff(m, m).is_empty()
