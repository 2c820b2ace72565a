"""Relay framing (DERP-style), sans-IO: both the relay server and meshd's relay client use this module.

A relay connection is a byte stream (HTTP ``Upgrade`` or WebSocket binary messages) of frames::

    +--------+----------------+----------------------+
    | type 1 | length 4 (BE)  | payload (length)     |
    +--------+----------------+----------------------+

Packets are addressed by the destination node's WireGuard public key (32 bytes), as in Tailscale's DERP.

The handshake is server-first, on both transports (after the ``101`` of the Upgrade, or once the
WebSocket is accepted)::

    relay  -> SERVER_CHALLENGE  region id (4, BE) + nonce (32 fresh random bytes, one per connection)
    client -> CLIENT_HELLO      WireGuard key (32) + flags (1) + Ed25519 signature (64) + ticket
    relay  -> SERVER_HELLO      JSON, or CLOSE with the reason

The signature is by the node key named in the ticket over :func:`hello_transcript` (the region id, the
nonce, the WireGuard key, the flags and the SHA-256 of the ticket), so a captured hello is worth nothing
on another connection (another nonce) or at another region (another region id, and the ticket names its
region too). A CLIENT_HELLO later on the same connection renews the ticket, signed over the same nonce.
Unknown types, oversized or truncated frames are protocol errors: the connection that sent them is
closed with the reason, nobody else is affected.

This module is the whole client/server contract, so neither side hard-codes any part of it: the HTTP
paths, the upgrade exchange (request, ``101`` answer, head size limit), the socket tuning both ends
apply, and the hello payloads. The standalone-relay feed (coordinator <-> ``coordinator relay serve``)
is :mod:`meshd.proto.relayfeed`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any
from urllib.parse import urlsplit

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

# -- HTTP: how a relay connection starts -------------------------------------------------------------
UPGRADE_PATH = "/api/v1/relay"  #: ``GET`` with ``Upgrade: meshrelay`` (RFC 9110 §7.8): raw frames after 101
WS_PATH = "/api/v1/relay/ws"  #: the WebSocket fallback: binary messages carry frames
TICKET_PATH = "/api/v1/relay/ticket"  #: ``POST`` (signed node request): a relay ticket for our key
UPGRADE_TOKEN = "meshrelay"
#: Largest HTTP head either side reads before giving up (request on the server, 101 on the client)
MAX_HEAD = 16384
#: Socket buffers of relay TCP sockets: NOT set by default, on purpose. An explicit SO_SNDBUF/SO_RCVBUF
#: turns the kernel's autotuning off; 4 MiB (the kernel doubles it) in front of a path that carries
#: 100-300 Mbit/s is 0.2-0.7 s of queue, and the inner TCP flows, whose packets ride in this stream,
#: see that as RTT and answer every loss late (TCP inside TCP). Autotuning (net.ipv4.tcp_wmem/tcp_rmem,
#: up to 4 and 6 MiB) sizes the buffers to the outer connection's bandwidth-delay product instead, which
#: covers a 20 ms link as well. Measured in one run (benchmarks/relay_throughput.py --only "TCP relay",
#: load ~11): 114 Mbit/s autotuned vs 86 with 4 MiB fixed. ``MESHRELAY_TCP_BUF=fixed`` in the
#: environment when a process starts sets SOCK_BUF again (the benchmark's comparison row).
SOCK_BUF = 4 << 20
#: (level, option, value) both ends set on a relay TCP socket (best effort: a failure is not an error)
SOCKET_OPTIONS: tuple[tuple[int, int, int], ...] = (
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),  # packets are latency-sensitive, never wait for Nagle
)
if os.environ.get("MESHRELAY_TCP_BUF") == "fixed":
    SOCKET_OPTIONS = (
        (socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF),
        (socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF),
        *SOCKET_OPTIONS,
    )
#: Asyncio write-buffer high-water mark on a relay connection, both ends: above it the peer counts as
#: slow (the relay queues up to QUEUE_BYTES more, then drops the oldest; meshd drops new packets). It
#: bounds process memory per connection, unlike the socket buffers (kernel memory, capped by tcp_wmem).
WRITE_HIGH = 256 << 10
#: Bytes of frames queued for one slow peer (relay: per client; meshd: per relay link) beyond the
#: transport buffer; past it the oldest (relay) or newest (meshd) packet is dropped and counted. 1 MiB is
#: ~700 full-size packets: far more than any TCP stall worth bridging, and N clients cost N MiB at most.
QUEUE_BYTES = 1 << 20
#: Largest WebSocket message either side accepts. One frame always fits.
MAX_WS_MESSAGE = 1 << 20
#: Largest WebSocket message a writer builds from queued frames (take_batch): the join copies the batch,
#: so a big backlog must not become one big bytes object.
WS_BATCH = 64 << 10
SWITCHING_PROTOCOLS = (
    f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {UPGRADE_TOKEN}\r\nConnection: Upgrade\r\n\r\n"
).encode("ascii")

KEY_LEN = 32
HEADER = struct.Struct("!BI")
HEADER_LEN = HEADER.size
#: Largest WireGuard datagram we relay. The mesh MTU is 1280 (meshd.mapapply.MESH_MTU) and a WireGuard
#: data message adds 16 bytes of header + 16 of tag: the largest packet today is 1280 + 32 = 1312 bytes
#: (handshake messages are 148, 92 and 64; a transport message pads its payload to 16 bytes, which
#: 1280 already is). 1500 leaves headroom for an MTU of up to 1468 later without a protocol change,
#: and still bounds every queued frame at about 1.5 KiB. A larger frame is a protocol error: the
#: relay closes the connection at its header, before buffering it (meshd drops and counts it instead
#: of sending it).
MAX_PACKET = 1500
MAX_FRAME = KEY_LEN + MAX_PACKET
MAX_HELLO = 8192
SIGNATURE_LEN = 64  #: Ed25519 (RFC 8032 §5.1.6)
NONCE_LEN = 32
MAX_REGION_ID = (1 << 31) - 1


class RelayProtocolError(ValueError):
    """The peer broke the framing; the message says what and where. Close that connection."""


class FrameType(IntEnum):
    CLIENT_HELLO = 0x01  #: key(32) + flags(1) + signature(64) + ticket; again later = ticket renewal
    SERVER_HELLO = 0x02  #: utf-8 JSON object: :class:`ServerHello`
    SEND_PACKET = 0x03  #: dst key(32) + packet
    RECV_PACKET = 0x04  #: src key(32) + packet
    PEER_GONE = 0x05  #: key(32) + reason(1): the destination is not connected here
    KEEPALIVE = 0x06  #: empty
    PING = 0x07  #: 8 opaque bytes
    PONG = 0x08  #: the 8 bytes of the PING it answers
    # 0x09 was HEALTH: never sent by any relay, removed; do not reuse the number
    CLOSE = 0x0A  #: utf-8 reason; the sender closes after it
    SERVER_CHALLENGE = 0x0B  #: region id(4) + nonce(32): the relay's first frame
    # UDP relay ports (meshd.proto.relayport): sent only to a relay whose SERVER_HELLO says udp_ports
    PORT_REQUEST = 0x0C  #: client: peer key(32): a UDP relay port for our side of the pair, please
    PORT_GRANT = 0x0D  #: relay: peer key(32) + port(2) + secret(16) + idle timeout s(2)
    PORT_STATE = 0x0E  #: relay: peer key(32) + flags(1) (bound: ours 1, the peer's 2; ended 4)


class GoneReason(IntEnum):
    NOT_CONNECTED = 0
    REMOVED = 1


_LIMITS: dict[int, tuple[int, int]] = {
    FrameType.CLIENT_HELLO: (KEY_LEN + 1 + SIGNATURE_LEN, KEY_LEN + 1 + SIGNATURE_LEN + MAX_HELLO),
    FrameType.SERVER_HELLO: (0, MAX_HELLO),
    FrameType.SEND_PACKET: (KEY_LEN, MAX_FRAME),
    FrameType.RECV_PACKET: (KEY_LEN, MAX_FRAME),
    FrameType.PEER_GONE: (KEY_LEN + 1, KEY_LEN + 1),
    FrameType.KEEPALIVE: (0, 0),
    FrameType.PING: (8, 8),
    FrameType.PONG: (8, 8),
    FrameType.CLOSE: (0, 1024),
    FrameType.SERVER_CHALLENGE: (4 + NONCE_LEN, 4 + NONCE_LEN),
    FrameType.PORT_REQUEST: (KEY_LEN, KEY_LEN),
    FrameType.PORT_GRANT: (KEY_LEN + 20, KEY_LEN + 20),
    FrameType.PORT_STATE: (KEY_LEN + 1, KEY_LEN + 1),
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


@dataclass(frozen=True, slots=True)
class Challenge:
    """SERVER_CHALLENGE: which region this is and a fresh nonce the client's hello must sign."""

    region_id: int
    nonce: bytes = field(repr=False)


def challenge(ch: Challenge) -> bytes:
    """The SERVER_CHALLENGE frame (encoder of :class:`Challenge`)."""
    if not 0 <= ch.region_id <= MAX_REGION_ID or len(ch.nonce) != NONCE_LEN:
        raise RelayProtocolError(f"challenge: region id below 2^31 and a {NONCE_LEN}-byte nonce")
    return encode(FrameType.SERVER_CHALLENGE, ch.region_id.to_bytes(4, "big") + ch.nonce)


def parse_challenge(frame: Frame) -> Challenge:
    """Decode a SERVER_CHALLENGE frame; anything else raises :class:`RelayProtocolError`."""
    if frame.type != FrameType.SERVER_CHALLENGE or len(frame.payload) != 4 + NONCE_LEN:
        raise RelayProtocolError("expected a SERVER_CHALLENGE frame")
    region_id = int.from_bytes(frame.payload[:4], "big")
    if region_id > MAX_REGION_ID:
        raise RelayProtocolError("SERVER_CHALLENGE: region id must be below 2^31")
    return Challenge(region_id, frame.payload[4:])


@dataclass(frozen=True, slots=True)
class ClientHello:
    """CLIENT_HELLO: who the client is (its WireGuard key), whether this region is its home, the ticket
    that says the coordinator lets it use this region, and its node key's signature over the
    connection's challenge (:func:`hello_transcript`). Sent again later to renew the ticket."""

    key: bytes
    home: bool
    signature: bytes = field(repr=False)
    ticket: bytes = field(repr=False)


_TRANSCRIPT = b"meshvpn relay hello v2\x00"


def hello_transcript(ch: Challenge, key: bytes, home: bool, ticket: bytes) -> bytes:
    """What the node key signs: a context label, the challenge (region id and nonce), the WireGuard key,
    the flags and the ticket's SHA-256. Everything the relay acts on is covered."""
    flags = HELLO_HOME if home else 0
    return b"".join(
        (
            _TRANSCRIPT,
            ch.region_id.to_bytes(4, "big"),
            ch.nonce,
            _key(key),
            bytes([flags]),
            hashlib.sha256(ticket).digest(),
        )
    )


def sign_hello(node_seed: bytes, ch: Challenge, key: bytes, home: bool, ticket: bytes) -> bytes:
    """The hello signature by the node whose Ed25519 seed is `node_seed`."""
    return SigningKey(node_seed).sign(hello_transcript(ch, key, home, ticket)).signature


def hello_signed_by(node_key: bytes, ch: Challenge, hello: ClientHello) -> bool:
    """True when `hello` carries `node_key`'s signature over this connection's challenge."""
    message = hello_transcript(ch, hello.key, hello.home, hello.ticket)
    try:
        VerifyKey(node_key).verify(message, hello.signature)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        return False
    return True


def client_hello(key: bytes, ticket: bytes, signature: bytes, home: bool = True) -> bytes:
    """The CLIENT_HELLO frame (encoder of :class:`ClientHello`)."""
    if len(signature) != SIGNATURE_LEN:
        raise RelayProtocolError(f"hello signature has {len(signature)} bytes, not {SIGNATURE_LEN}")
    flags = bytes([HELLO_HOME if home else 0])
    return encode(FrameType.CLIENT_HELLO, _key(key) + flags + signature + ticket)


def parse_hello(frame: Frame) -> ClientHello:
    """The parts of a CLIENT_HELLO frame (its length was checked by the decoder)."""
    if frame.type != FrameType.CLIENT_HELLO or len(frame.payload) < KEY_LEN + 1 + SIGNATURE_LEN:
        raise RelayProtocolError("expected a CLIENT_HELLO frame")
    p = frame.payload
    sig_end = KEY_LEN + 1 + SIGNATURE_LEN
    return ClientHello(p[:KEY_LEN], bool(p[KEY_LEN] & HELLO_HOME), p[KEY_LEN + 1 : sig_end], p[sig_end:])


MAX_REGION_NAME = 255
MAX_KEEPALIVE = 86400.0


@dataclass(frozen=True, slots=True)
class ServerHello:
    """SERVER_HELLO: the relay accepted the client. JSON on the wire (unknown fields are ignored, so a
    newer relay may add some)."""

    region: str  #: the region's name
    region_id: int
    keepalive: float  #: seconds between the relay's keepalives (a hint for dead-link detection)
    #: the relay serves UDP relay ports (PORT_* frames); absent (False) from older relays
    udp_ports: bool = False


def server_hello(hello: ServerHello) -> bytes:
    """The SERVER_HELLO frame (encoder of :class:`ServerHello`)."""
    if not 0 < len(hello.region) <= MAX_REGION_NAME:
        raise RelayProtocolError(f"region name must have 1 to {MAX_REGION_NAME} characters")
    body: dict[str, Any] = {"region": hello.region, "region_id": hello.region_id}
    body["keepalive"] = hello.keepalive
    if hello.udp_ports:
        body["udp_ports"] = True
    return encode(FrameType.SERVER_HELLO, json.dumps(body).encode())


def parse_server_hello(frame: Frame) -> ServerHello:
    """Decode a SERVER_HELLO frame; anything malformed raises :class:`RelayProtocolError`."""
    if frame.type != FrameType.SERVER_HELLO:
        raise RelayProtocolError("expected a SERVER_HELLO frame")
    try:
        raw: Any = json.loads(frame.payload)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and huge integers too
        raise RelayProtocolError("SERVER_HELLO is not JSON") from None
    if not isinstance(raw, dict):
        raise RelayProtocolError("SERVER_HELLO is not a JSON object")
    region, region_id, keepalive = raw.get("region"), raw.get("region_id"), raw.get("keepalive")
    if not isinstance(region, str) or not 0 < len(region) <= MAX_REGION_NAME:
        raise RelayProtocolError("SERVER_HELLO: region must be a name")
    if not isinstance(region_id, int) or isinstance(region_id, bool) or not 0 <= region_id <= MAX_REGION_ID:
        raise RelayProtocolError("SERVER_HELLO: region_id must be a small non-negative integer")
    # bounded before float(): a 400-digit integer would overflow it (1e400 parses as inf, not finite)
    if not (
        (isinstance(keepalive, int) and not isinstance(keepalive, bool) and 0 < keepalive <= MAX_KEEPALIVE)
        or (isinstance(keepalive, float) and math.isfinite(keepalive) and 0 < keepalive <= MAX_KEEPALIVE)
    ):
        raise RelayProtocolError("SERVER_HELLO: keepalive must be a positive number of seconds")
    return ServerHello(region, region_id, float(keepalive), raw.get("udp_ports") is True)


MAX_URL = 1024


def region_problem(region_id: int, name: str, url: str, stun_port: int) -> str | None:
    """What is wrong with a relay region as a relay map entry (None when nothing): the id must fit a
    SERVER_HELLO (1 to 2^31-1), the name 1 to 255 printable characters, the URL ``http(s)://host[:port]``
    that parses (``http://[`` does not), and the STUN port 0 (none) or a port whose next one exists.
    Checked where a region enters (the coordinator's feed) and where it is used (meshd's map decoder)."""
    if not isinstance(region_id, int) or isinstance(region_id, bool) or not 1 <= region_id <= MAX_REGION_ID:
        return "id must be an integer from 1 to 2^31-1"
    if not isinstance(name, str) or not 0 < len(name) <= MAX_REGION_NAME or not name.isprintable():
        return f"name must be 1 to {MAX_REGION_NAME} printable characters"
    if not isinstance(stun_port, int) or isinstance(stun_port, bool) or not 0 <= stun_port <= 65534:
        return "stun_port must be 0 (none) or a port from 1 to 65534 (STUN uses it and the next one)"
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL or not url.isprintable() or " " in url:
        return f"url must be up to {MAX_URL} printable characters without spaces"
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 - parses the port: out of range or not a number raises ValueError
    except ValueError:
        return "url does not parse"
    if u.scheme not in ("http", "https") or not u.hostname or u.username is not None:
        return "url must be http(s)://host[:port]"
    if u.path not in ("", "/") or u.query or u.fragment:
        return "url must be http(s)://host[:port] (no path, query or fragment)"
    return None


def peer_gone(key: bytes, reason: GoneReason = GoneReason.NOT_CONNECTED) -> bytes:
    return encode(FrameType.PEER_GONE, _key(key) + bytes([reason]))


def _key(key: bytes) -> bytes:
    if len(key) != KEY_LEN:
        raise RelayProtocolError(f"node key has {len(key)} bytes, not {KEY_LEN}")
    return key


# -- the upgrade exchange --------------------------------------------------------------------------------
def upgrade_request(netloc: str) -> bytes:
    """The client's ``GET`` asking to switch to relay framing (``netloc`` is the URL's host[:port])."""
    if not netloc or any(c in netloc for c in "\r\n \t"):
        raise RelayProtocolError("relay host is not a valid Host header value")
    return (
        f"GET {UPGRADE_PATH} HTTP/1.1\r\nHost: {netloc}\r\nUpgrade: {UPGRADE_TOKEN}\r\n"
        "Connection: Upgrade\r\n\r\n"
    ).encode("latin-1")


def is_upgrade_request(head: bytes) -> bool:
    """True for ``GET /api/v1/relay HTTP/1.1`` with ``Upgrade: meshrelay`` and ``Connection: upgrade``
    (``head``: the request head without the final blank line). Anything else is plain HTTP."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[1].split(b"?")[0] != UPGRADE_PATH.encode():
        return False
    upgrade = connection = False
    token = UPGRADE_TOKEN.encode()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        tokens = [v.strip().lower() for v in value.split(b",")]
        if name == b"upgrade" and token in tokens:
            upgrade = True
        elif name == b"connection" and b"upgrade" in tokens:
            connection = True
    return upgrade and connection


def check_upgrade_response(head: bytes) -> None:
    """The relay's answer head (without the final blank line): raise unless it is ``101``."""
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if not status.startswith("HTTP/1.1 101"):
        raise RelayProtocolError(f"relay refused the upgrade: {status.strip()[:200]}")


def take_batch(queue: collections.deque[bytes], limit: int = WS_BATCH) -> bytes:
    """Pop queued frames from the left while they fit in ``limit`` bytes (at least one) and join them:
    one WebSocket message for many small frames, never one larger than the peer accepts."""
    parts = [queue.popleft()]
    size = len(parts[0])
    while queue and size + len(queue[0]) <= limit:
        size += len(queue[0])
        parts.append(queue.popleft())
    return b"".join(parts)


def websocket_url(base: str, path: str) -> str:
    """``http(s)://host[:port]`` + path as the ``ws(s)://`` URL of a WebSocket endpoint."""
    base = base.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise RelayProtocolError(f"not an http(s) URL: {base[:200]!r}")
    return "ws" + base[len("http") :] + path


def check_header(t: int, length: int, pos: int) -> FrameType:
    """The type of a frame header, or :class:`RelayProtocolError` for an unknown type or a length outside
    the type's limits (``pos``: the header's stream offset, for the message)."""
    try:
        ftype = FrameType(t)
    except ValueError:
        raise RelayProtocolError(f"unknown frame type 0x{t:02x} at stream offset +{pos}") from None
    lo, hi = _LIMITS[ftype]
    if not lo <= length <= hi:
        raise RelayProtocolError(f"{ftype.name} frame of {length} bytes outside [{lo}, {hi}]")
    return ftype


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
            ftype = check_header(t, length, pos)
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
