"""Relay framing (DERP-style), sans-IO: both the relay server and meshd's relay client use this module.

A relay connection is a byte stream (HTTP ``Upgrade`` or WebSocket binary messages) of frames::

    +--------+----------------+----------------------+
    | type 1 | length 4 (BE)  | payload (length)     |
    +--------+----------------+----------------------+

Packets are addressed by the destination node's WireGuard public key (32 bytes), as in Tailscale's DERP.
The client speaks first (``CLIENT_HELLO`` with its key and a relay ticket); the server answers
``SERVER_HELLO`` or closes. Unknown types, oversized or truncated frames are protocol errors: the
connection that sent them is closed with the reason, nobody else is affected.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

KEY_LEN = 32
HEADER = struct.Struct("!BI")
HEADER_LEN = HEADER.size
#: Largest WireGuard datagram we relay (an MTU of 65535 would be absurd; WireGuard over the relay uses
#: the interface MTU, at most ~1500 + 32 bytes of overhead) plus the key.
MAX_PACKET = 65535
MAX_FRAME = KEY_LEN + MAX_PACKET
MAX_HELLO = 8192


class RelayProtocolError(ValueError):
    """The peer broke the framing; the message says what and where. Close that connection."""


class FrameType(IntEnum):
    CLIENT_HELLO = 0x01  #: key(32) + flags(1) + ticket (meshd.proto.ticket); again later = ticket renewal
    SERVER_HELLO = 0x02  #: utf-8 JSON with server info (region, keepalive interval)
    SEND_PACKET = 0x03  #: dst key(32) + packet
    RECV_PACKET = 0x04  #: src key(32) + packet
    PEER_GONE = 0x05  #: key(32) + reason(1): the destination is not connected here
    KEEPALIVE = 0x06  #: empty
    PING = 0x07  #: 8 opaque bytes
    PONG = 0x08  #: the 8 bytes of the PING it answers
    HEALTH = 0x09  #: utf-8 text; empty means healthy
    CLOSE = 0x0A  #: utf-8 reason; the sender closes after it


class GoneReason(IntEnum):
    NOT_CONNECTED = 0
    REMOVED = 1


_LIMITS: dict[int, tuple[int, int]] = {
    FrameType.CLIENT_HELLO: (KEY_LEN + 1, KEY_LEN + 1 + MAX_HELLO),
    FrameType.SERVER_HELLO: (0, MAX_HELLO),
    FrameType.SEND_PACKET: (KEY_LEN, MAX_FRAME),
    FrameType.RECV_PACKET: (KEY_LEN, MAX_FRAME),
    FrameType.PEER_GONE: (KEY_LEN + 1, KEY_LEN + 1),
    FrameType.KEEPALIVE: (0, 0),
    FrameType.PING: (8, 8),
    FrameType.PONG: (8, 8),
    FrameType.HEALTH: (0, 1024),
    FrameType.CLOSE: (0, 1024),
}


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame; ``payload`` is the bytes after the header (key included for keyed types)."""

    type: FrameType
    payload: bytes

    @property
    def key(self) -> bytes:
        """The 32-byte node key of keyed frames (hello, send, receive, gone)."""
        return self.payload[:KEY_LEN]

    @property
    def body(self) -> bytes:
        """What follows the key: the packet, the ticket or the gone reason."""
        return self.payload[KEY_LEN:]


def encode(ftype: FrameType, payload: bytes = b"") -> bytes:
    """One frame; checks the per-type size limits so a bug here never reaches the wire."""
    lo, hi = _LIMITS[ftype]
    if not lo <= len(payload) <= hi:
        raise RelayProtocolError(f"{ftype.name} payload of {len(payload)} bytes outside [{lo}, {hi}]")
    return HEADER.pack(ftype, len(payload)) + payload


def send_packet(dst: bytes, packet: bytes) -> bytes:
    return encode(FrameType.SEND_PACKET, _key(dst) + packet)


def recv_packet(src: bytes, packet: bytes) -> bytes:
    return encode(FrameType.RECV_PACKET, _key(src) + packet)


#: CLIENT_HELLO flag: this region is the client's home (the coordinator publishes it as ``relay_home``)
HELLO_HOME = 0x01


def client_hello(key: bytes, ticket: bytes, home: bool = True) -> bytes:
    return encode(FrameType.CLIENT_HELLO, _key(key) + bytes([HELLO_HOME if home else 0]) + ticket)


@dataclass(frozen=True, slots=True)
class Hello:
    key: bytes
    home: bool
    ticket: bytes


def parse_hello(frame: Frame) -> Hello:
    """The parts of a CLIENT_HELLO frame (its length was checked by the decoder)."""
    if frame.type != FrameType.CLIENT_HELLO or len(frame.payload) < KEY_LEN + 1:
        raise RelayProtocolError("expected a CLIENT_HELLO frame")
    p = frame.payload
    return Hello(p[:KEY_LEN], bool(p[KEY_LEN] & HELLO_HOME), p[KEY_LEN + 1 :])


def frame_header(ftype: FrameType, length: int) -> bytes:
    """Just the 5-byte header (the hot path writes header and payload parts without joining them)."""
    return HEADER.pack(ftype, length)


def peer_gone(key: bytes, reason: GoneReason = GoneReason.NOT_CONNECTED) -> bytes:
    return encode(FrameType.PEER_GONE, _key(key) + bytes([reason]))


def _key(key: bytes) -> bytes:
    if len(key) != KEY_LEN:
        raise RelayProtocolError(f"node key has {len(key)} bytes, not {KEY_LEN}")
    return key


class FrameDecoder:
    """Incremental decoder for a byte stream: :meth:`feed` bytes as they arrive, get whole frames back.

    Raises :class:`RelayProtocolError` on an unknown type or a length outside the type's limits, as soon
    as the header arrives (an oversized frame is refused before it is buffered).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        n = len(buf)
        while n - pos >= HEADER_LEN:
            t, length = HEADER.unpack_from(buf, pos)
            try:
                ftype = FrameType(t)
            except ValueError:
                raise RelayProtocolError(f"unknown frame type 0x{t:02x} at stream offset +{pos}") from None
            lo, hi = _LIMITS[ftype]
            if not lo <= length <= hi:
                raise RelayProtocolError(f"{ftype.name} frame of {length} bytes outside [{lo}, {hi}]")
            end = pos + HEADER_LEN + length
            if end > n:
                break
            frames.append(Frame(ftype, bytes(buf[pos + HEADER_LEN : end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames

    def eof(self) -> None:
        """The stream ended: leftover bytes mean a truncated frame."""
        if self._buf:
            raise RelayProtocolError(f"stream ended inside a frame ({len(self._buf)} bytes left)")
