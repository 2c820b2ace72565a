"""UAPI codec: real wireguard-go replies, round trips, and "any text raises only UapiError"."""

from __future__ import annotations

import contextlib
from base64 import b64decode, b64encode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto.endpoint import format_endpoint
from meshd.wg import uapi
from meshd.wg.diff import AddPeer, RemovePeer, SetDevice, UpdatePeer
from meshd.wg.errors import UapiError
from meshd.wg.keys import generate_private_key, public_key
from meshd.wg.model import PeerConfig

# Captured from wireguard-go v0.0.20220316 (Debian 12) after
# `wg set IF private-key K listen-port 0 fwmark 0x1234 peer A preshared-key P endpoint [fd00::2]:51820
#  allowed-ips 10.9.0.0/24,fd00:9::/64 persistent-keepalive 25 peer B endpoint 192.0.2.7:4000
#  allowed-ips 10.9.1.1/32`  (throw-away keys).
REAL_GET = (
    b"private_key=f8150b6d2b9ec45db37d708c32bb485e5de7ed90c74239911a5094a8f451e14b\nlisten_port=55485\n"
    b"fwmark=4660\npublic_key=39e532b5d260e4321b09462ea341fb2f8fd828d62ce32107cde2c8f86b943445\n"
    b"preshared_key=4a99499ea4f8aed98da35eb742ac9337cb64cc4bb99b84e870a38f29afe5f1b3\nprotocol_version=1\n"
    b"endpoint=[fd00::2]:51820\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\n"
    b"rx_bytes=0\npersistent_keepalive_interval=25\nallowed_ip=10.9.0.0/24\nallowed_ip=fd00:9::/64\n"
    b"public_key=e54090a41b2ea0392a074111cbd69816583fb35cb26d6dbefb349c8db764cf16\n"
    b"preshared_key=0000000000000000000000000000000000000000000000000000000000000000\nprotocol_version=1\n"
    b"endpoint=192.0.2.7:4000\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\n"
    b"rx_bytes=0\npersistent_keepalive_interval=0\nallowed_ip=10.9.1.1/32\nerrno=0\n\n"
)
# ...and what `wg show IF dump` printed for the same device.
REAL_DUMP_PUBLIC = "FGgmgAA8AzhEgEC7oAXKzn3yUbFSCLZidYZyl3hJDis="
REAL_DUMP_PEER_A = "OeUytdJg5DIbCUYuo0H7L4/YKNYs4yEHzeLI+GuUNEU="
REAL_DUMP_PSK_A = "SplJnqT4rtmNo163QqyTN8tkzEu5m4TocKOPKa/l8bM="
REAL_DUMP_PEER_B = "5UCQpBsuoDkqB0ERy9aYFlg/s1yybW2++zScjbdkzxY="


def test_real_get_reply_decodes_like_wg_show_dump() -> None:
    state = uapi.decode_get(REAL_GET, "wg0")
    assert (state.name, state.public_key, state.listen_port, state.fwmark) == (
        "wg0", REAL_DUMP_PUBLIC, 55485, 0x1234,
    )
    a, b = state.peers
    assert a.public_key == REAL_DUMP_PEER_A and a.preshared_key == REAL_DUMP_PSK_A
    assert a.endpoint == ("fd00::2", 51820)
    assert a.allowed_ips == ("10.9.0.0/24", "fd00:9::/64")
    assert (a.persistent_keepalive, a.last_handshake, a.rx_bytes, a.tx_bytes) == (25, None, 0, 0)
    assert b.public_key == REAL_DUMP_PEER_B and b.preshared_key is None
    assert b.endpoint == ("192.0.2.7", 4000) and b.allowed_ips == ("10.9.1.1/32",)
    assert state.peer(REAL_DUMP_PEER_B) == b


def test_handshake_time_and_counters() -> None:
    pk = public_key(generate_private_key()).encode()
    reply = (
        b"listen_port=1\npublic_key=" + b64decode(pk).hex().encode()
        + b"\nlast_handshake_time_sec=1700000000\n"
        b"last_handshake_time_nsec=500000000\nrx_bytes=7\ntx_bytes=9\nerrno=0\n\n"
    )
    (peer,) = uapi.decode_get(reply, "x").peers
    assert peer.last_handshake == 1700000000.5 and (peer.rx_bytes, peer.tx_bytes) == (7, 9)


def test_empty_device() -> None:
    state = uapi.decode_get(b"listen_port=0\nerrno=0\n\n", "wg1")
    assert state.public_key is None and state.peers == () and state.listen_port == 0


def test_errno_reply_is_a_clear_uapi_error() -> None:
    with pytest.raises(UapiError, match=r"errno=-22 \(Invalid argument\)") as info:
        uapi.decode_set(b"errno=-22\n\n")
    assert info.value.errno == -22
    uapi.decode_set(b"errno=0\n\n")


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"errno=0\n", "truncated"),
        (b"listen_port=1\n\n", "does not end with errno"),
        (b"garbage\nerrno=0\n\n", "line 1 is not key=value"),
        (b"listen_port=x\nerrno=0\n\n", "not an unsigned 16-bit"),
        (b"public_key=zz\nerrno=0\n\n", "not a 64-digit hex key"),
        (b"\xff=1\nerrno=0\n\n", "not ASCII"),
    ],
)
def test_malformed_replies(reply: bytes, message: str) -> None:
    with pytest.raises(UapiError, match=message):
        uapi.decode_get(reply, "wg0")


def test_reply_complete() -> None:
    assert not uapi.reply_complete(b"errno=0\n")
    assert uapi.reply_complete(b"errno=0\n\n")


def test_set_request_text() -> None:
    priv = generate_private_key()
    a, b, c = (public_key(generate_private_key()) for _ in range(3))
    hx = {k: b64decode(k).hex() for k in (priv, a, b, c)}
    req = uapi.encode_set(
        [
            RemovePeer(c),
            SetDevice(private_key=priv, listen_port=51820, fwmark=0),
            UpdatePeer(b, endpoint=("::1", 9), persistent_keepalive=0),
            AddPeer(PeerConfig(a, allowed_ips=("10.0.0.1/32", "fd00::/64"), endpoint=("10.1.1.1", 5),
                               persistent_keepalive=25)),
        ]
    ).decode()
    assert req == (
        f"set=1\nprivate_key={hx[priv]}\nlisten_port=51820\nfwmark=0\n"
        f"public_key={hx[c]}\nremove=true\n"
        f"public_key={hx[b]}\nupdate_only=true\nendpoint=[::1]:9\npersistent_keepalive_interval=0\n"
        f"public_key={hx[a]}\nendpoint=10.1.1.1:5\npersistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\nallowed_ip=10.0.0.1/32\nallowed_ip=fd00::/64\n\n"
    )
    assert "replace_peers" not in req


keys = st.binary(min_size=32, max_size=32).map(lambda b: b64encode(b).decode())
nets = st.sampled_from(["10.0.0.0/8", "10.1.2.3/32", "fd00::/64", "fd00::1/128", "192.168.0.0/16"])
peers = st.builds(
    PeerConfig,
    public_key=keys,
    allowed_ips=st.lists(nets, max_size=4).map(tuple),
    endpoint=st.none() | st.tuples(st.sampled_from(["10.0.0.1", "fd00::2", "6.0.0.9"]),
                                   st.integers(1, 65535)),
    persistent_keepalive=st.integers(0, 65535),
    preshared_key=st.none() | keys,
)


def _as_get_reply(peer_list: list[PeerConfig]) -> bytes:
    """Render peers the way wireguard-go answers get=1 (what a set of these AddPeers produces)."""
    lines = ["listen_port=41641"]
    for p in peer_list:
        lines.append(f"public_key={b64decode(p.public_key).hex()}")
        lines.append(f"preshared_key={b64decode(p.preshared_key or 'A' * 43 + '=').hex()}")
        if p.endpoint:
            lines.append(f"endpoint={format_endpoint(p.endpoint)}")
        lines.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
        lines += [f"allowed_ip={n}" for n in p.allowed_ips]
    return ("\n".join([*lines, "errno=0"]) + "\n\n").encode()


@given(st.lists(peers, max_size=5, unique_by=lambda p: p.public_key))
def test_peer_values_round_trip_through_uapi_text(peer_list: list[PeerConfig]) -> None:
    state = uapi.decode_get(_as_get_reply(peer_list), "wg0")
    got = [
        PeerConfig(p.public_key, p.allowed_ips, p.endpoint, p.persistent_keepalive, p.preshared_key)
        for p in state.peers
    ]
    assert got == peer_list
    # and the set request for them names every key and network exactly once per peer
    req = uapi.encode_set([AddPeer(p) for p in peer_list]).decode()
    assert req.count("public_key=") == len(peer_list)
    assert req.count("allowed_ip=") == sum(len(p.allowed_ips) for p in peer_list)


@given(st.binary(max_size=300))
def test_any_bytes_raise_only_uapi_error(data: bytes) -> None:
    with contextlib.suppress(UapiError):
        uapi.decode_get(data, "wg0")


line = st.tuples(
    st.sampled_from(["public_key", "private_key", "preshared_key", "endpoint", "allowed_ip", "listen_port",
                     "fwmark", "rx_bytes", "tx_bytes", "last_handshake_time_sec", "errno",
                     "persistent_keepalive_interval", "protocol_version", "x"]),
    st.text(max_size=70) | st.sampled_from(["0", "1", "[::1]:5", "1.2.3.4:0", "a" * 64, "10.0.0.0/33",
                                            "1" * 30, "-22", "fe80::1%eth0/64"]),
)


@given(st.lists(line, max_size=12), st.booleans())
def test_any_key_value_text_raises_only_uapi_error(lines: list[tuple[str, str]], terminate: bool) -> None:
    text = "".join(f"{k}={v}\n" for k, v in lines) + ("errno=0\n\n" if terminate else "")
    with contextlib.suppress(UapiError):
        uapi.decode_get(text.encode("utf-8", "surrogatepass"), "wg0")
