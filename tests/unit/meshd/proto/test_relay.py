"""The relay contract: framing (round trips, streaming in arbitrary chunks, refusal of bad frames), the
hellos, and the HTTP upgrade exchange."""

from __future__ import annotations

import collections
import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import relay

KEY = bytes(range(32))


def test_send_packet_roundtrip() -> None:
    data = relay.send_packet(KEY, b"wireguard bytes")
    [frame] = relay.FrameDecoder().feed(data)
    assert frame.type == relay.FrameType.SEND_PACKET
    assert frame.key == KEY and frame.body == b"wireguard bytes"


def test_unknown_type_is_refused_with_reason() -> None:
    with pytest.raises(relay.RelayProtocolError, match="unknown frame type 0x7f"):
        relay.FrameDecoder().feed(b"\x7f\x00\x00\x00\x00")


def test_the_retired_health_type_is_unknown() -> None:
    """0x09 was HEALTH, which no relay ever sent: it is gone from the protocol, not reused."""
    assert 0x09 not in {int(t) for t in relay.FrameType}
    with pytest.raises(relay.RelayProtocolError, match="unknown frame type 0x09"):
        relay.FrameDecoder().feed(b"\x09\x00\x00\x00\x00")


def test_oversized_frame_refused_from_the_header_alone() -> None:
    header = relay.HEADER.pack(relay.FrameType.SEND_PACKET, relay.MAX_FRAME + 1)
    with pytest.raises(relay.RelayProtocolError, match="outside"):
        relay.FrameDecoder().feed(header)


def test_keyed_frame_shorter_than_a_key_is_refused() -> None:
    with pytest.raises(relay.RelayProtocolError):
        relay.FrameDecoder().feed(relay.HEADER.pack(relay.FrameType.RECV_PACKET, 5) + b"12345")


def test_truncated_stream_detected_at_eof() -> None:
    d = relay.FrameDecoder()
    assert d.feed(relay.send_packet(KEY, b"abc")[:-1]) == []
    with pytest.raises(relay.RelayProtocolError, match="stream ended inside a frame"):
        d.eof()


def test_encoder_refuses_bad_sizes() -> None:
    with pytest.raises(relay.RelayProtocolError):
        relay.encode(relay.FrameType.PING, b"short")
    with pytest.raises(relay.RelayProtocolError):
        relay.send_packet(b"short key", b"x")


frames = st.one_of(
    st.builds(relay.send_packet, st.binary(min_size=32, max_size=32), st.binary(max_size=2000)),
    st.builds(relay.recv_packet, st.binary(min_size=32, max_size=32), st.binary(max_size=2000)),
    st.builds(
        relay.client_hello,
        st.binary(min_size=32, max_size=32),
        st.binary(max_size=300),
        st.binary(min_size=64, max_size=64),
    ),
    st.builds(relay.Challenge, st.integers(0, relay.MAX_REGION_ID), st.binary(min_size=32, max_size=32)).map(
        relay.challenge
    ),
    st.builds(relay.peer_gone, st.binary(min_size=32, max_size=32), st.sampled_from(relay.GoneReason)),
    st.just(relay.encode(relay.FrameType.KEEPALIVE)),
    st.binary(min_size=8, max_size=8).map(lambda b: relay.encode(relay.FrameType.PING, b)),
    st.text(max_size=50).map(lambda t: relay.encode(relay.FrameType.CLOSE, t.encode())),
    st.builds(
        relay.ServerHello, st.text(min_size=1, max_size=20), st.integers(0, 1000), st.floats(0.5, 60)
    ).map(relay.server_hello),
)


@given(st.lists(frames, max_size=10), st.lists(st.integers(1, 500), max_size=30))
def test_stream_in_any_chunking_yields_the_same_frames(wire: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(wire)
    d = relay.FrameDecoder()
    got: list[relay.Frame] = []
    pos = 0
    for c in cuts:
        got += d.feed(stream[pos : pos + c])
        pos += c
    got += d.feed(stream[pos:])
    d.eof()
    assert [relay.encode(f.type, f.payload) for f in got] == wire


@given(st.binary(max_size=300))
def test_any_bytes_raise_only_relay_protocol_error(data: bytes) -> None:
    with contextlib.suppress(relay.RelayProtocolError):
        d = relay.FrameDecoder()
        d.feed(data)
        d.eof()


# -- hellos ------------------------------------------------------------------------------------------------
@given(
    st.binary(min_size=32, max_size=32),
    st.binary(max_size=300),
    st.binary(min_size=64, max_size=64),
    st.booleans(),
)
def test_client_hello_roundtrip(key: bytes, ticket: bytes, signature: bytes, home: bool) -> None:
    [frame] = relay.FrameDecoder().feed(relay.client_hello(key, ticket, signature, home))
    assert relay.parse_hello(frame) == relay.ClientHello(key, home, signature, ticket)


@given(st.integers(0, relay.MAX_REGION_ID), st.binary(min_size=32, max_size=32))
def test_challenge_roundtrip(region_id: int, nonce: bytes) -> None:
    [frame] = relay.FrameDecoder().feed(relay.challenge(relay.Challenge(region_id, nonce)))
    assert relay.parse_challenge(frame) == relay.Challenge(region_id, nonce)


@given(st.binary(min_size=36, max_size=36))
def test_any_challenge_payload_raises_only_relay_protocol_error(payload: bytes) -> None:
    with contextlib.suppress(relay.RelayProtocolError):
        relay.parse_challenge(relay.Frame(relay.FrameType.SERVER_CHALLENGE, payload))


@given(st.binary(max_size=200))
def test_any_hello_payload_raises_only_relay_protocol_error(payload: bytes) -> None:
    with contextlib.suppress(relay.RelayProtocolError):
        relay.parse_hello(relay.Frame(relay.FrameType.CLIENT_HELLO, payload))


def test_the_hello_signature_covers_region_nonce_key_flags_and_ticket() -> None:
    """A hello signed for one connection verifies there only: any other nonce, region, key, home flag
    or ticket (or another node key) fails."""
    from nacl.signing import SigningKey

    seed = bytes(range(32))
    node_key = bytes(SigningKey(seed).verify_key)
    ch = relay.Challenge(2, bytes(32))
    key, ticket = bytes([7]) * 32, b"ticket"
    hello = relay.ClientHello(key, True, relay.sign_hello(seed, ch, key, True, ticket), ticket)
    assert relay.hello_signed_by(node_key, ch, hello)
    others = [
        (node_key, relay.Challenge(2, bytes([1]) * 32), hello),
        (node_key, relay.Challenge(1, bytes(32)), hello),
        (node_key, ch, relay.ClientHello(bytes([8]) * 32, True, hello.signature, ticket)),
        (node_key, ch, relay.ClientHello(key, False, hello.signature, ticket)),
        (node_key, ch, relay.ClientHello(key, True, hello.signature, b"ticket2")),
        (bytes(SigningKey(bytes(32)).verify_key), ch, hello),
        (b"short", ch, hello),
    ]
    for nk, c, h in others:
        assert not relay.hello_signed_by(nk, c, h)


@pytest.mark.parametrize(
    ("region", "problem"),
    [
        ((2, "r", "http://[", 0), "does not parse"),
        ((2, "r", "http://h:99999", 0), "does not parse"),
        ((2, "r", "ftp://h", 0), "http(s)://host"),
        ((2, "r", "http://", 0), "http(s)://host"),
        ((2, "r", "http://u@h", 0), "http(s)://host"),
        ((2, "r", "http://h/path", 0), "no path"),
        ((2, "r", "http://h\n", 0), "printable"),
        ((2, "r", "", 0), "printable"),
        ((0, "r", "http://h", 0), "id must be"),
        ((1 << 31, "r", "http://h", 0), "id must be"),
        ((2, "", "http://h", 0), "name must be"),
        ((2, "r", "http://h", 65535), "stun_port"),
        ((2, "r", "http://h", -1), "stun_port"),
    ],
)
def test_bad_regions_say_what_is_wrong(region: tuple[int, str, str, int], problem: str) -> None:
    assert problem in (relay.region_problem(*region) or "")


def test_good_regions_pass() -> None:
    for url in ("http://127.0.0.1:8080", "https://relay.example.com/", "http://[::1]:80", "http://h"):
        assert relay.region_problem(2, "region2", url, 3478) is None, url


@given(st.integers(), st.text(max_size=40), st.text(max_size=60), st.integers())
def test_region_check_never_raises(region_id: int, name: str, url: str, port: int) -> None:
    relay.region_problem(region_id, name, url, port)  # a problem is returned, never raised


@given(
    st.text(min_size=1, max_size=relay.MAX_REGION_NAME),
    st.integers(0, (1 << 31) - 1),
    st.floats(0.001, relay.MAX_KEEPALIVE),
)
def test_server_hello_roundtrip(region: str, region_id: int, keepalive: float) -> None:
    hello = relay.ServerHello(region, region_id, keepalive)
    [frame] = relay.FrameDecoder().feed(relay.server_hello(hello))
    assert relay.parse_server_hello(frame) == hello


def test_server_hello_ignores_fields_it_does_not_know() -> None:
    body = {"region": "r", "region_id": 2, "keepalive": 20, "new": [1]}
    frame = relay.Frame(relay.FrameType.SERVER_HELLO, json.dumps(body).encode())
    assert relay.parse_server_hello(frame) == relay.ServerHello("r", 2, 20.0)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"[]",
        b'{"region": "r", "region_id": 1}',
        b'{"region": "", "region_id": 1, "keepalive": 20}',
        b'{"region": "r", "region_id": true, "keepalive": 20}',
        b'{"region": "r", "region_id": 1, "keepalive": -1}',
        b'{"region": "r", "region_id": 1, "keepalive": 1e400}',
        b'{"region": "r", "region_id": 1, "keepalive": ' + b"9" * 5000 + b"}",
        b"\xff\xfe",
    ],
)
def test_bad_server_hello_is_refused(payload: bytes) -> None:
    with pytest.raises(relay.RelayProtocolError, match="SERVER_HELLO"):
        relay.parse_server_hello(relay.Frame(relay.FrameType.SERVER_HELLO, payload))


@given(st.binary(max_size=300))
def test_any_server_hello_payload_raises_only_relay_protocol_error(payload: bytes) -> None:
    with contextlib.suppress(relay.RelayProtocolError):
        relay.parse_server_hello(relay.Frame(relay.FrameType.SERVER_HELLO, payload))


@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(), st.lists))
def test_any_json_server_hello_raises_only_relay_protocol_error(value: object) -> None:
    body = {"region": value, "region_id": value, "keepalive": value}
    with contextlib.suppress(relay.RelayProtocolError):
        relay.parse_server_hello(relay.Frame(relay.FrameType.SERVER_HELLO, json.dumps(body).encode()))


# -- the upgrade exchange ----------------------------------------------------------------------------------
def test_the_client_request_is_what_the_server_accepts() -> None:
    request = relay.upgrade_request("relay.example:8443")
    assert request.endswith(b"\r\n\r\n")
    assert relay.is_upgrade_request(request[:-4])
    relay.check_upgrade_response(relay.SWITCHING_PROTOCOLS[:-4])


@pytest.mark.parametrize(
    "head",
    [
        b"GET /api/v1/relay HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade",
        b"GET /api/v1/relay HTTP/1.1\r\nHost: x\r\nUpgrade: meshrelay",
        b"POST /api/v1/relay HTTP/1.1\r\nUpgrade: meshrelay\r\nConnection: Upgrade",
        b"GET /api/v1/relayx HTTP/1.1\r\nUpgrade: meshrelay\r\nConnection: Upgrade",
        b"GET /healthz HTTP/1.1\r\nHost: x",
        b"",
    ],
)
def test_anything_but_the_relay_upgrade_is_plain_http(head: bytes) -> None:
    assert not relay.is_upgrade_request(head)


def test_header_names_and_tokens_are_case_insensitive() -> None:
    head = b"GET /api/v1/relay?x=1 HTTP/1.1\r\nupgrade: MeshRelay\r\nCONNECTION: keep-alive, Upgrade"
    assert relay.is_upgrade_request(head)


def test_a_refused_upgrade_says_what_the_relay_answered() -> None:
    with pytest.raises(relay.RelayProtocolError, match=r"relay refused the upgrade: HTTP/1\.1 404 Not Found"):
        relay.check_upgrade_response(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0")


def test_a_host_that_would_inject_headers_is_refused() -> None:
    with pytest.raises(relay.RelayProtocolError):
        relay.upgrade_request("x\r\nEvil: 1")


@given(st.binary(max_size=400))
def test_any_head_is_classified_or_refused_without_other_errors(head: bytes) -> None:
    relay.is_upgrade_request(head)
    with contextlib.suppress(relay.RelayProtocolError):
        relay.check_upgrade_response(head)


def test_websocket_url() -> None:
    assert (
        relay.websocket_url("https://r.example:8443/", relay.WS_PATH)
        == "wss://r.example:8443/api/v1/relay/ws"
    )
    assert relay.websocket_url("http://10.0.0.1", "/x") == "ws://10.0.0.1/x"
    with pytest.raises(relay.RelayProtocolError):
        relay.websocket_url("ftp://x", "/x")


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=50), st.integers(1, 2000))
def test_batches_keep_order_and_size_unless_one_frame_is_larger(frames: list[bytes], limit: int) -> None:
    queue = collections.deque(frames)
    batches = []
    while queue:
        batches.append(relay.take_batch(queue, limit))
    assert b"".join(batches) == b"".join(frames)
    assert all(len(b) <= max(limit, max(map(len, frames))) for b in batches)


def test_packets_are_capped_at_what_wireguard_sends_at_the_mesh_mtu() -> None:
    from meshd.mapapply import MESH_MTU

    # a WireGuard transport message: 16 bytes of header, the padded payload, a 16-byte tag
    assert MESH_MTU + 32 <= relay.MAX_PACKET <= 1500
    ok = relay.HEADER.pack(relay.FrameType.SEND_PACKET, relay.MAX_FRAME) + bytes(relay.MAX_FRAME)
    assert relay.FrameDecoder().feed(ok)[0].body == bytes(relay.MAX_PACKET)
    with pytest.raises(relay.RelayProtocolError, match="outside"):  # refused at the header, unbuffered
        relay.FrameDecoder().feed(relay.HEADER.pack(relay.FrameType.RECV_PACKET, relay.MAX_FRAME + 1))


def test_a_websocket_batch_is_bounded_however_long_the_backlog() -> None:
    frame = bytes(relay.HEADER_LEN + relay.MAX_FRAME)
    queue = collections.deque([frame] * 2000)
    batch = relay.take_batch(queue)
    assert len(batch) <= relay.WS_BATCH <= relay.MAX_WS_MESSAGE
    assert len(queue) == 2000 - len(batch) // len(frame)
