"""The data-path splitter (meshd.proto.relaystream): the same frames and the same refusals as
relay.FrameDecoder whatever the chunking, packet frames as (key, view) without a copy."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import relay
from meshd.proto.relaystream import PacketStream

from .test_relay import frames

KEY = bytes(range(32))
TYPES = [relay.FrameType.SEND_PACKET, relay.FrameType.RECV_PACKET]


def _wire(items: list[relay.Frame | tuple[bytes, memoryview]], ptype: relay.FrameType) -> list[bytes]:
    out = []
    for it in items:
        if isinstance(it, tuple):
            assert isinstance(it[1], memoryview) and it[1].readonly
            out.append(relay.encode(ptype, it[0] + bytes(it[1])))
        else:
            assert it.type != ptype  # packet frames of the stream's type never come out as Frame
            out.append(relay.encode(it.type, it.payload))
    return out


@given(
    st.lists(frames, max_size=12),
    st.lists(st.integers(1, 700), max_size=30),
    st.sampled_from(TYPES),
)
def test_any_chunking_yields_the_frames_of_the_decoder(
    wire: list[bytes], cuts: list[int], ptype: relay.FrameType
) -> None:
    stream = b"".join(wire)
    ends = [*itertools.accumulate(cuts), len(stream)]
    s = PacketStream(ptype)
    got = [item for a, b in zip([0, *ends], ends) for item in s.feed(stream[a:b])]  # noqa: B905
    s.eof()
    assert _wire(got, ptype) == wire


@given(st.binary(max_size=300), st.integers(1, 300), st.sampled_from(TYPES))
def test_any_bytes_are_refused_like_the_decoder_refuses_them(
    data: bytes, cut: int, ptype: relay.FrameType
) -> None:
    def outcome(feed: list[bytes], decoder: relay.FrameDecoder | PacketStream) -> object:
        try:
            n = sum(len(decoder.feed(chunk)) for chunk in feed)
            decoder.eof()
        except relay.RelayProtocolError:
            return "refused"
        return n

    chunks = [data[:cut], data[cut:]]
    assert outcome(chunks, PacketStream(ptype)) == outcome(chunks, relay.FrameDecoder())


def test_an_oversized_packet_frame_is_refused_from_its_header_alone() -> None:
    s = PacketStream(relay.FrameType.SEND_PACKET)
    with pytest.raises(relay.RelayProtocolError, match="outside"):
        s.feed(relay.HEADER.pack(relay.FrameType.SEND_PACKET, relay.MAX_FRAME + 1))


def test_packets_are_views_into_the_read_not_copies() -> None:
    data = relay.send_packet(KEY, b"first") + relay.send_packet(KEY, b"second")
    [(k1, p1), (k2, p2)] = PacketStream(relay.FrameType.SEND_PACKET).feed(data)  # type: ignore[misc]
    assert (k1, bytes(p1), k2, bytes(p2)) == (KEY, b"first", KEY, b"second")
    assert p1.obj is data and p2.obj is data


def test_a_mutable_buffer_is_copied_once_so_views_cannot_change_under_a_writer() -> None:
    data = bytearray(relay.send_packet(KEY, b"packet"))
    [(_, p)] = PacketStream(relay.FrameType.SEND_PACKET).feed(data)  # type: ignore[arg-type,misc]
    data[-1:] = b"X"
    assert bytes(p) == b"packet"
