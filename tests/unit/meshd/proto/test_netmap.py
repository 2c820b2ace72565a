"""Network map diff/apply and codecs (meshd.proto.netmap)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import netmap
from meshd.proto.netmap import Delta, NetMap, Peer, RelayRegion
from meshd.proto.policy import ALLOW_ALL, InboundRule

names = st.text(alphabet="abcdefgh-", min_size=1, max_size=8)
strs = st.lists(st.text(max_size=12), max_size=3).map(tuple)


def peers(node_id: int) -> st.SearchStrategy[Peer]:
    return st.builds(
        Peer,
        node_id=st.just(node_id),
        name=names,
        ips=strs,
        wg_public_key=st.sampled_from("ab"),
        node_public_key=st.sampled_from("cd"),
        cert=st.sampled_from(["c1", "c2"]),
        endpoints=strs,
        relay_home=st.none() | st.integers(1, 3),
        online=st.booleans(),
        tags=strs,
    )


relays = st.lists(
    st.builds(RelayRegion, id=st.integers(1, 3), name=names, url=names, stun_port=st.integers(1, 65535)),
    max_size=2,
).map(tuple)


inbound = st.sampled_from(
    [ALLOW_ALL, (), (InboundRule(("100.64.0.1/32", "fd7a::1/128"), "tcp", ((22, 22), (80, 90))),)]
)


@st.composite
def maps(draw: st.DrawFn, self_id: int = 0) -> NetMap:
    ids = draw(st.sets(st.integers(1, 12), max_size=8))
    ps = tuple(draw(peers(i)) for i in sorted(ids))
    return NetMap(
        version=draw(st.integers(0, 1000)),
        self_node=draw(peers(self_id)),
        peers=ps,
        relays=draw(relays),
        policy=draw(st.text(max_size=5)),
        domain=draw(st.sampled_from(["mesh", "x"])),
        inbound=draw(inbound),
    )


@given(maps(), maps())
def test_apply_of_diff_gives_the_new_map(old: NetMap, new: NetMap) -> None:
    assert netmap.apply(old, netmap.diff(old, new)) == new


@given(maps(), maps())
def test_delta_survives_its_json_codec(old: NetMap, new: NetMap) -> None:
    d = netmap.diff(old, new)
    text = netmap.encode_server_message(netmap.DeltaMessage(d))
    assert netmap.decode_server_message(text) == netmap.DeltaMessage(d)


@given(maps())
def test_map_survives_its_json_codec(m: NetMap) -> None:
    assert netmap.decode_server_message(
        netmap.encode_server_message(netmap.MapMessage(m))
    ) == netmap.MapMessage(m)


@given(maps())
def test_diff_of_equal_maps_is_empty(m: NetMap) -> None:
    assert netmap.diff(m, m).is_empty()


def test_endpoint_only_changes_use_the_compact_form() -> None:
    a = Peer(1, "a", ("100.64.0.1/32",), "k", "n", "c")
    old = NetMap(1, Peer(0, "me", (), "k0", "n0", "c0"), (a,), (), "", "mesh")
    new = NetMap(
        2,
        old.self_node,
        (Peer(1, "a", ("100.64.0.1/32",), "k", "n", "c", ("1.2.3.4:5",), None, True),),
        (),
        "",
        "mesh",
    )
    d = netmap.diff(old, new)
    assert d.endpoints_changed == ((1, ("1.2.3.4:5",), True),) and not d.peers_changed


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "map",
                    "delta",
                    "to",
                    "from",
                    "payload",
                    "candidates",
                    "version",
                    "self",
                    "peers",
                    "node_id",
                    "message",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@given(json_values)
def test_any_json_raises_only_netmap_error(value: object) -> None:
    text = json.dumps(value)
    for decode in (netmap.decode_client_message, netmap.decode_server_message):
        with contextlib.suppress(netmap.NetmapError):
            decode(text)


@given(st.binary(max_size=200))
def test_any_bytes_raise_only_netmap_error(data: bytes) -> None:
    for decode in (netmap.decode_client_message, netmap.decode_server_message):
        with contextlib.suppress(netmap.NetmapError):
            decode(data)


def test_client_messages_are_bounded() -> None:
    with pytest.raises(netmap.NetmapError, match="at most 32"):
        netmap.decode_client_message(json.dumps({"type": "endpoints", "candidates": ["1.2.3.4:5"] * 33}))
    with pytest.raises(netmap.NetmapError, match="larger than"):
        netmap.decode_client_message(b" " * (netmap.MAX_MESSAGE_BYTES + 1))
    assert netmap.decode_client_message('{"type":"signal","to":2,"payload":{}}') == netmap.SignalMessage(
        2, {}
    )
    assert isinstance(Delta(1, 2), Delta)
