"""Network map diff/apply and codecs (meshd.proto.netmap)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from meshd.proto import netmap
from meshd.proto.cert import key_id
from meshd.proto.netmap import Delta, NetMap, Peer, RelayRegion
from meshd.proto.policy import ALLOW_ALL, InboundRule

names = st.text(alphabet="abcdefgh-", min_size=1, max_size=8)
strs = st.lists(st.text(max_size=12), max_size=3).map(tuple)


#: canonical candidates only: maps drop any other spelling on decode (issue 13)
candidates = st.lists(
    st.sampled_from(["1.2.3.4:5", "6.0.0.1:41641", "[2a00::1]:51820", "[fe80::1]:1", "10.0.0.2:65535"]),
    max_size=3,
).map(tuple)


def peers(node_id: int) -> st.SearchStrategy[Peer]:
    return st.builds(
        Peer,
        node_id=st.just(node_id),
        name=names,
        ips=strs,
        wg_public_key=st.sampled_from("ab"),
        node_public_key=st.sampled_from("cd"),
        cert=st.sampled_from(["c1", "c2"]),
        endpoints=candidates,
        relay_home=st.none() | st.integers(1, 3),
        online=st.booleans(),
        tags=strs,
    )


relays = st.lists(
    st.builds(
        RelayRegion,
        id=st.integers(1, 3),
        name=names,
        url=st.sampled_from(["http://r1:8080", "https://r2.example"]),
        stun_port=st.integers(0, 65534),
    ),
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
        policy="",  # maps carry no policy text (least knowledge)
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
                    "key",
                    "sig",
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


# ------------------------------------------------------------------------------------------- signed maps

KEY = SigningKey(bytes(range(32)))
OTHER_KEY = SigningKey(bytes(range(1, 33)))
TRUSTED = [bytes(KEY.verify_key)]
ME = 7


def _decoded(text: str) -> netmap.MapMessage | netmap.DeltaMessage:
    msg = netmap.decode_server_message(text)
    assert isinstance(msg, netmap.MapMessage | netmap.DeltaMessage)
    return msg


@given(maps(self_id=ME))
def test_a_signed_map_verifies_for_its_recipient_only(m: NetMap) -> None:
    msg = _decoded(netmap.encode_signed(netmap.MapMessage(m), ME, KEY))
    assert msg == netmap.MapMessage(m) and netmap.signer(msg) == key_id(bytes(KEY.verify_key))
    netmap.verify(msg, ME, TRUSTED)
    with pytest.raises(netmap.NetmapError, match="does not verify for node 8"):
        netmap.verify(msg, ME + 1, TRUSTED)


@given(maps(), maps())
def test_a_signed_delta_verifies_for_its_recipient_only(old: NetMap, new: NetMap) -> None:
    d = netmap.diff(old, new)
    msg = _decoded(netmap.encode_signed(netmap.DeltaMessage(d), ME, KEY))
    assert msg == netmap.DeltaMessage(d)
    netmap.verify(msg, ME, TRUSTED)
    with pytest.raises(netmap.NetmapError, match="does not verify"):
        netmap.verify(msg, 0, TRUSTED)


def _a_map() -> NetMap:
    a = Peer(1, "a", ("100.64.0.1/32",), "k", "n", "c", ("1.2.3.4:5",), 1, True, ("tag:web",))
    return NetMap(
        3,
        Peer(ME, "me", (), "k0", "n0", "c0"),
        (a,),
        (RelayRegion(1, "r", "http://r", 3478),),
        "",
        "mesh",
        ALLOW_ALL,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("inbound", [{"src": ["0.0.0.0/0"], "proto": "any", "ports": []}, {"src": [], "proto": "tcp"}]),
        ("relays", [{"id": 1, "name": "r", "url": "http://evil", "stun_port": 3478}]),
        ("version", 4),
        ("domain", "evil"),
    ],
)
def test_any_rewritten_field_is_refused(field: str, value: object) -> None:
    raw = json.loads(netmap.encode_signed(netmap.MapMessage(_a_map()), ME, KEY))
    raw["map"][field] = value
    with pytest.raises(netmap.NetmapError, match="does not verify"):
        netmap.verify(_decoded(json.dumps(raw)), ME, TRUSTED)


def test_a_swapped_peer_key_or_endpoint_is_refused() -> None:
    for field, value in (("node_public_key", "evil"), ("endpoints", ["6.6.6.6:1"]), ("relay_home", 2)):
        raw = json.loads(netmap.encode_signed(netmap.MapMessage(_a_map()), ME, KEY))
        raw["map"]["peers"][0][field] = value
        with pytest.raises(netmap.NetmapError, match="does not verify"):
            netmap.verify(_decoded(json.dumps(raw)), ME, TRUSTED)


def test_unsigned_or_unknown_key_or_resigned_by_another_key_is_refused() -> None:
    plain = _decoded(netmap.encode_server_message(netmap.MapMessage(_a_map())))
    with pytest.raises(netmap.NetmapError, match="not signed"):
        netmap.verify(plain, ME, TRUSTED)
    forged = _decoded(netmap.encode_signed(netmap.MapMessage(_a_map()), ME, OTHER_KEY))
    with pytest.raises(netmap.NetmapError, match="unknown key"):
        netmap.verify(forged, ME, TRUSTED)
    raw = json.loads(netmap.encode_signed(netmap.MapMessage(_a_map()), ME, OTHER_KEY))
    raw["key"] = key_id(bytes(KEY.verify_key))  # claims the trusted key, signed by another
    with pytest.raises(netmap.NetmapError, match="does not verify"):
        netmap.verify(_decoded(json.dumps(raw)), ME, TRUSTED)
    netmap.verify(forged, ME, [*TRUSTED, bytes(OTHER_KEY.verify_key)])  # once that key is trusted: fine


def test_whitespace_or_key_order_does_not_matter_but_content_does() -> None:
    raw = json.loads(netmap.encode_signed(netmap.MapMessage(_a_map()), ME, KEY))
    netmap.verify(_decoded(json.dumps(raw, indent=2)), ME, TRUSTED)  # canonical form is re-computed


@given(st.integers(0, 10_000), st.integers(0, 255))
def test_a_changed_byte_never_verifies_with_other_content(position: int, byte: int) -> None:
    m = _a_map()
    text = netmap.encode_signed(netmap.MapMessage(m), ME, KEY).encode()
    position %= len(text)
    changed = text[:position] + bytes([byte]) + text[position + 1 :]
    try:
        msg = _decoded(changed)  # type: ignore[arg-type]
        netmap.verify(msg, ME, TRUSTED)
    except (netmap.NetmapError, AssertionError):
        return
    assert msg == netmap.MapMessage(m)


def test_order_old_maps_and_deltas_that_do_not_follow_are_refused() -> None:
    m = _a_map()  # version 3
    netmap.check_order(m, netmap.MapMessage(replace(m, version=3)))
    netmap.check_order(m, netmap.MapMessage(replace(m, version=9)))
    netmap.check_order(None, netmap.MapMessage(m))
    with pytest.raises(netmap.NetmapError, match="older than ours"):
        netmap.check_order(m, netmap.MapMessage(replace(m, version=2)))
    netmap.check_order(m, netmap.DeltaMessage(Delta(3, 4)))
    for stale in (Delta(2, 3), Delta(4, 5), Delta(3, 2)):
        with pytest.raises(netmap.NetmapError, match="does not follow"):
            netmap.check_order(m, netmap.DeltaMessage(stale))
    with pytest.raises(netmap.NetmapError, match="without a map"):
        netmap.check_order(None, netmap.DeltaMessage(Delta(3, 4)))


def test_an_older_coordinators_policy_text_is_accepted_and_dropped() -> None:
    raw = netmap.map_to_json(_a_map())
    raw["policy"] = '[groups]\nadmins = ["alice"]\n'
    got = netmap.decode_server_message(json.dumps({"type": "map", "map": raw}))
    assert isinstance(got, netmap.MapMessage) and got.map.policy == "" and got.map == _a_map()
    d = netmap.decode_server_message(
        json.dumps({"type": "delta", "delta": {"from_version": 3, "version": 4, "policy": "x"}})
    )
    assert d == netmap.DeltaMessage(Delta(3, 4))
    assert "policy" not in netmap.encode_signed(netmap.MapMessage(_a_map()), ME, KEY)


@given(st.sampled_from(["key", "sig"]), json_values)
def test_any_signature_fields_raise_only_netmap_error(field: str, value: object) -> None:
    raw = json.loads(netmap.encode_signed(netmap.MapMessage(_a_map()), ME, KEY))
    raw[field] = value
    with contextlib.suppress(netmap.NetmapError):
        netmap.verify(_decoded(json.dumps(raw)), ME, TRUSTED)


def test_a_maps_non_canonical_candidates_are_dropped_not_fatal() -> None:
    """A zone-id endpoint stored before issue 13 reaches no writer and costs nothing else in the map."""
    hostile = "[2a00::1%x]:1\nremove=true\nendpoint=[::1]:51820"
    a = Peer(1, "a", ("100.64.0.1/32",), "k", "n", "c", ("6.0.0.1:41641", hostile, "[2A00::1]:7"), None, True)
    m = NetMap(1, Peer(0, "me", (), "k0", "n0", "c0"), (a,), (), "", "mesh")
    back = netmap.map_from_json(json.loads(json.dumps(netmap.map_to_json(m))))
    assert back.peers[0].endpoints == ("6.0.0.1:41641", "[2a00::1]:7")
    d = netmap.diff(m, replace(m, version=2, peers=(replace(a, endpoints=(hostile,)),)))
    assert netmap.delta_from_json(json.loads(json.dumps(netmap.delta_to_json(d)))).endpoints_changed == (
        (1, (), True),
    )
