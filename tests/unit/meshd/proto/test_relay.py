"""Relay framing: round trips, streaming in arbitrary chunks, and refusal of bad frames."""

from __future__ import annotations

import contextlib

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
    st.builds(relay.client_hello, st.binary(min_size=32, max_size=32), st.binary(max_size=300)),
    st.builds(relay.peer_gone, st.binary(min_size=32, max_size=32), st.sampled_from(relay.GoneReason)),
    st.just(relay.encode(relay.FrameType.KEEPALIVE)),
    st.binary(min_size=8, max_size=8).map(lambda b: relay.encode(relay.FrameType.PING, b)),
    st.text(max_size=50).map(lambda t: relay.encode(relay.FrameType.HEALTH, t.encode())),
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
