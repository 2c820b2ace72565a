"""One connection to one relay region: HTTP Upgrade (RFC 9110 §7.8) first, WebSocket as fallback.

The link speaks :mod:`meshd.proto.relay`: the relay's SERVER_CHALLENGE first (its region id must be the
one we meant to reach), then our CLIENT_HELLO (key, home flag, ticket, and the node key's signature over
the challenge), SERVER_HELLO back, then SEND_PACKET out and RECV_PACKET in.

Outbound data is bounded on both transports: while the relay does not keep up (the Upgrade transport's
buffer is above :data:`meshd.proto.relay.WRITE_HIGH` (256 KiB), or the WebSocket writer is
:data:`OUT_FRAMES` or :data:`meshd.proto.relay.QUEUE_BYTES` (1 MiB) behind) packets are dropped and
counted, as a congested network would; WireGuard recovers. Control frames (ping, ticket renewal, close)
are never dropped: we send them on our own timers, so they cannot pile up. A packet over
:data:`meshd.proto.relay.MAX_PACKET` is dropped too (the relay would close the link on it).

The data path (issue 14): packets from the local proxies are written to the Upgrade transport in batches
(what arrived in one event-loop iteration, at most :data:`BATCH`: one ``writelines``, one send, instead of
one per packet; uvloop reads up to 32 datagrams per wake-up, so a batch fills under load and costs no
latency when idle), and the relay's RECV_PACKET frames are split by
:class:`meshd.proto.relaystream.PacketStream`, so a packet reaches the proxy socket as a memoryview into
the bytes read, without a copy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

from meshd.proto import relay
from meshd.proto.relay import Challenge, FrameType, RelayProtocolError, ServerHello
from meshd.proto.relaystream import PacketStream

log = logging.getLogger("meshd.relay")

CONNECT_TIMEOUT = 5.0
OUT_FRAMES = 2048  #: WebSocket frames queued for the writer task at most (then packets are dropped)
#: packets written to the Upgrade transport at once at most (~42 KiB at the mesh MTU)
BATCH = 32


class RelayLinkError(Exception):
    """Connecting to or talking with a relay failed; the message says how."""


PacketHandler = Callable[[bytes, memoryview], None]  #: (src key, packet: a view into the bytes read)
Signer = Callable[[bytes], bytes]  #: signs a hello transcript with the node key


class _Hello:
    """What our hello needs: who we are, the ticket, the node key's signer and the region we dial."""

    def __init__(self, key: bytes, ticket: bytes, sign: Signer, region_id: int, home: bool) -> None:
        self.key = key
        self.ticket = ticket
        self.sign = sign
        self.region_id = region_id
        self.home = home
        self.challenge: Challenge | None = None

    def frame(self, key: bytes, ticket: bytes, home: bool) -> bytes:
        assert self.challenge is not None
        signature = self.sign(relay.hello_transcript(self.challenge, key, home, ticket))
        return relay.client_hello(key, ticket, signature, home)


def _tune(sock: socket.socket | None) -> None:
    if sock is None:
        return
    for level, opt, value in relay.SOCKET_OPTIONS:
        with contextlib.suppress(OSError):  # best effort: beyond rmem_max, or not a TCP socket
            sock.setsockopt(level, opt, value)


def _peer_ip(transport: Any) -> str | None:
    """The IPv4 address a transport is connected to (None for IPv6 or unknown: no UDP relay ports)."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str) and ":" not in peer[0]:
        return peer[0]
    return None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (nobody awaits a hello that failed after connect gave up)."""
    if not fut.cancelled():
        fut.exception()


class _Base:
    """What both transports share: frame dispatch, hello handshake, ping/pong."""

    def __init__(self, on_packet: PacketHandler, on_gone: Callable[[bytes], None], hello: _Hello) -> None:
        self.on_packet = on_packet
        self.on_gone = on_gone
        #: PORT_GRANT / PORT_STATE frames (UDP relay ports, meshd.proto.relayport); set by the manager
        self.on_port: Callable[[relay.Frame], None] = lambda f: None
        self.peer_ip: str | None = None  #: the relay's IPv4 address as connected (its UDP ports live there)
        self.me = hello
        self.decoder = PacketStream(FrameType.RECV_PACKET)
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[ServerHello] = loop.create_future()
        self.hello.add_done_callback(_retrieve)
        self.closed: asyncio.Future[str] = loop.create_future()
        #: pings in flight, by token: one entry per ping() call, removed when it returns
        self.pings: dict[bytes, asyncio.Future[float]] = {}
        self.last_rx = time.monotonic()
        self.dropped = 0  #: packets not sent because the relay did not keep up

    def write(self, data: bytes, droppable: bool = False) -> None:
        raise NotImplementedError

    def packet(self, dst: bytes, packet: bytes) -> None:
        """SEND_PACKET(dst, packet), dropped (and counted) while the relay does not keep up."""
        self.write(relay.HEADER.pack(FrameType.SEND_PACKET, relay.KEY_LEN + len(packet)) + dst + packet, True)

    def close(self, reason: str) -> None:
        raise NotImplementedError

    def _frames(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            frames = self.decoder.feed(data)
        except RelayProtocolError as exc:
            self.close(f"relay broke the framing: {exc}")
            return
        on_packet = self.on_packet
        for f in frames:
            if type(f) is tuple:  # RECV_PACKET
                on_packet(f[0], f[1])
                continue
            assert isinstance(f, relay.Frame)
            t = f.type
            if t == FrameType.SERVER_CHALLENGE:
                me = self.me
                if me.challenge is not None:
                    self.close("relay sent a second SERVER_CHALLENGE")
                    return
                try:
                    ch = relay.parse_challenge(f)
                except RelayProtocolError as exc:
                    self.close(f"relay sent a bad SERVER_CHALLENGE: {exc}")
                    return
                if ch.region_id != me.region_id:
                    self.close(f"relay says it is region {ch.region_id}, not {me.region_id}")
                    return
                me.challenge = ch
                self.write(me.frame(me.key, me.ticket, me.home))
            elif t == FrameType.SERVER_HELLO:
                try:
                    if self.me.challenge is None:
                        raise RelayProtocolError("SERVER_HELLO before SERVER_CHALLENGE")
                    info = relay.parse_server_hello(f)
                except RelayProtocolError as exc:
                    self.close(f"relay sent a bad SERVER_HELLO: {exc}")
                    return
                if not self.hello.done():
                    self.hello.set_result(info)
            elif t == FrameType.PONG:
                fut = self.pings.get(f.payload)
                if fut is not None and not fut.done():
                    fut.set_result(time.monotonic())
            elif t == FrameType.PEER_GONE:
                self.on_gone(f.key)
            elif t in (FrameType.PORT_GRANT, FrameType.PORT_STATE):
                self.on_port(f)
            elif t == FrameType.CLOSE:
                self.close("relay closed the connection: " + f.payload.decode("utf-8", "replace"))
                return

    def _lost(self, reason: str) -> None:
        if not self.hello.done():
            self.hello.set_exception(RelayLinkError(reason))
        if not self.closed.done():
            self.closed.set_result(reason)
        for fut in self.pings.values():
            # an error, not cancel(): the ping's caller was not cancelled, its link went away
            if not fut.done():
                fut.set_exception(RelayLinkError(f"relay link closed: {reason}"))


class _UpgradeProtocol(_Base, asyncio.Protocol):
    def __init__(
        self, on_packet: PacketHandler, on_gone: Callable[[bytes], None], hello: _Hello, request: bytes
    ) -> None:
        _Base.__init__(self, on_packet, on_gone, hello)
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()  #: the 101 answer so far: at most relay.MAX_HEAD bytes
        self.upgraded = False
        self.paused = False
        #: packets for the next batch write, as (header + key, packet) pairs of parts
        self.out: list[bytes] = []
        self.flush_due = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        transport.set_write_buffer_limits(high=relay.WRITE_HIGH)
        _tune(transport.get_extra_info("socket"))
        self.peer_ip = _peer_ip(transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self._frames(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > relay.MAX_HEAD:
                self.close("relay answered with an oversized HTTP head")
            return
        try:
            relay.check_upgrade_response(bytes(self.head[:end]))
        except RelayProtocolError as exc:
            self.close(str(exc))
            return
        self.upgraded = True
        rest = bytes(self.head[end + 4 :])
        self.head.clear()
        if rest:
            self._frames(rest)

    def pause_writing(self) -> None:
        self.paused = True  # the transport buffer passed relay.WRITE_HIGH: drop packets until it drains

    def resume_writing(self) -> None:
        self.paused = False

    def write(self, data: bytes, droppable: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if droppable and self.paused:
            self.dropped += 1
            return
        if self.out:  # packets first: frames go out in the order they were written
            self.flush()
        self.transport.write(data)

    def packet(self, dst: bytes, packet: bytes) -> None:
        if self.paused or self.transport is None:
            self.dropped += 1
            return
        out = self.out
        out.append(relay.HEADER.pack(FrameType.SEND_PACKET, relay.KEY_LEN + len(packet)) + dst)
        out.append(packet)
        if len(out) >= 2 * BATCH:
            self.flush()
        elif not self.flush_due:
            self.flush_due = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write the batched packets (one send); called once per loop iteration while packets come."""
        self.flush_due = False
        if not self.out:
            return
        parts, self.out = self.out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(parts)

    def close(self, reason: str) -> None:
        self._lost(reason)
        self.out.clear()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc}" if exc else "relay closed the connection")


class _WsLink(_Base):
    def __init__(
        self, on_packet: PacketHandler, on_gone: Callable[[bytes], None], hello: _Hello, ws: Any
    ) -> None:
        super().__init__(on_packet, on_gone, hello)
        self.ws = ws
        #: frames for the writer task: packets only while fewer than OUT_FRAMES and relay.QUEUE_BYTES
        #: wait (see module doc); ``queued`` is their size in bytes
        self.out: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.wake = asyncio.Event()
        self.tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._writer())]

    async def _reader(self) -> None:
        try:
            async for msg in self.ws:
                if isinstance(msg, str):
                    self.close("relay sent a text message")
                    return
                self._frames(msg)
        except Exception as exc:  # the websocket failed: the link is lost (CancelledError propagates)
            self._lost(f"websocket: {exc}")
        self._lost("relay closed the websocket")

    async def _writer(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.out:
                    batch = relay.take_batch(self.out)
                    self.queued -= len(batch)
                    await self.ws.send(batch)
        except Exception as exc:  # the websocket failed: the link is lost (CancelledError propagates)
            self._lost(f"websocket: {exc}")

    def write(self, data: bytes, droppable: bool = False) -> None:
        if self.closed.done():
            return
        if droppable and (len(self.out) >= OUT_FRAMES or self.queued + len(data) > relay.QUEUE_BYTES):
            self.dropped += 1
            return
        self.out.append(data)
        self.queued += len(data)
        self.wake.set()

    def close(self, reason: str) -> None:
        self._lost(reason)
        for t in self.tasks:
            t.cancel()
        self.out.clear()
        self.queued = 0
        closer = asyncio.get_running_loop().create_task(self._close_ws())
        self.tasks.append(closer)  # a reference, so the closing task is not collected midway

    async def _close_ws(self) -> None:
        with contextlib.suppress(Exception):  # the websocket may be broken already; we are done with it
            await self.ws.close()


class RelayLink:
    """A connected relay link. Use :func:`connect`."""

    def __init__(self, impl: _Base, transport: str, info: ServerHello) -> None:
        self._impl = impl
        self.transport = transport  #: "upgrade" or "websocket"
        self.info = info

    @property
    def closed(self) -> asyncio.Future[str]:
        return self._impl.closed

    @property
    def is_open(self) -> bool:
        return not self._impl.closed.done()

    @property
    def idle(self) -> float:
        return time.monotonic() - self._impl.last_rx

    @property
    def dropped(self) -> int:
        """Packets not sent because the relay did not keep up."""
        return self._impl.dropped

    def send_packet(self, dst: bytes, packet: bytes) -> None:
        if len(packet) > relay.MAX_PACKET:
            # the relay would close the whole link on such a frame; WireGuard at the mesh MTU never
            # sends one, so this is a misconfigured MTU: drop and count it like a congested network
            self._impl.dropped += 1
            return
        self._impl.packet(dst, packet)

    @property
    def on_port(self) -> Callable[[relay.Frame], None]:
        return self._impl.on_port

    @on_port.setter
    def on_port(self, handler: Callable[[relay.Frame], None]) -> None:
        self._impl.on_port = handler

    @property
    def peer_ip(self) -> str | None:
        return self._impl.peer_ip

    @property
    def udp_ports(self) -> bool:
        """The relay serves UDP relay ports (its SERVER_HELLO said so)."""
        return self.info.udp_ports

    def request_port(self, peer: bytes) -> None:
        """PORT_REQUEST: a UDP relay port for our side of the pair with ``peer``."""
        self._impl.write(relay.encode(FrameType.PORT_REQUEST, peer))

    def renew(self, key: bytes, ticket: bytes, home: bool) -> None:
        """A fresh ticket (or the home flag) over the open link, signed over this link's challenge."""
        self._impl.write(self._impl.me.frame(key, ticket, home))

    async def ping(self, within: float = 2.0) -> float:
        """Round-trip time of one relay PING, in seconds.

        Raises :class:`RelayLinkError` when no PONG comes within ``within`` seconds or the link closes;
        cancelling the caller cancels the ping (``CancelledError`` propagates, it is not a link error).
        """
        token = os.urandom(8)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._impl.pings[token] = fut
        start = time.monotonic()
        try:
            self._impl.write(relay.encode(FrameType.PING, token))
            async with asyncio.timeout(within):
                return (await fut) - start
        except TimeoutError:
            raise RelayLinkError("relay did not answer a ping") from None
        finally:
            self._impl.pings.pop(token, None)

    def close(self, reason: str = "closed by meshd") -> None:
        if self.is_open:
            self._impl.write(relay.encode(FrameType.CLOSE, reason.encode()[:1024]))
        self._impl.close(reason)


async def connect(
    url: str,
    key: bytes,
    ticket: bytes,
    *,
    sign: Signer,
    region_id: int,
    home: bool,
    on_packet: PacketHandler,
    on_gone: Callable[[bytes], None] = lambda k: None,
    ssl_context: ssl.SSLContext | None = None,
    within: float = CONNECT_TIMEOUT,
    transports: tuple[str, ...] = ("upgrade", "websocket"),
) -> RelayLink:
    """Connect to relay region `region_id` at `url` (the region's http(s) URL): Upgrade first, then
    WebSocket. `sign` signs the relay's challenge with the node key; `ticket` must be for this region.

    Every failure, a malformed URL included, is a :class:`RelayLinkError`. ``asyncio.timeout`` rather
    than ``wait_for``: in Python 3.11 ``wait_for`` returns the result and swallows the cancellation when
    both arrive together, which left a link open after :meth:`RelayManager.close`.
    """
    errors = []
    for kind in transports:
        hello = _Hello(key, ticket, sign, region_id, home)
        try:
            async with asyncio.timeout(within):
                if kind == "upgrade":
                    return await _connect_upgrade(url, hello, on_packet, on_gone, ssl_context)
                return await _connect_ws(url, hello, on_packet, on_gone, ssl_context)
        except TimeoutError:
            errors.append(f"{kind}: no answer within {within:g} s")
        except Exception as exc:  # OSError, TLS, HTTP refusal, websockets' own errors, a bad URL
            errors.append(f"{kind}: {exc or type(exc).__name__}")
    raise RelayLinkError(f"cannot connect to relay {url!r} ({'; '.join(errors)})")


def _split(url: str) -> tuple[str, int, bool, str]:
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:  # an out-of-range or non-numeric port
        raise RelayLinkError(f"bad relay URL {url!r}") from None
    tls = u.scheme == "https"
    if u.scheme not in ("http", "https") or not u.hostname:
        raise RelayLinkError(f"bad relay URL {url!r}")
    return u.hostname, port or (443 if tls else 80), tls, u.netloc


async def _connect_upgrade(
    url: str,
    hello: _Hello,
    on_packet: PacketHandler,
    on_gone: Callable[[bytes], None],
    ssl_context: ssl.SSLContext | None,
) -> RelayLink:
    host, port, tls, netloc = _split(url)
    request = relay.upgrade_request(netloc)  # the hello waits for the relay's challenge
    loop = asyncio.get_running_loop()
    ctx = (ssl_context or ssl.create_default_context()) if tls else None
    _, proto = await loop.create_connection(
        lambda: _UpgradeProtocol(on_packet, on_gone, hello, request), host, port, ssl=ctx
    )
    try:
        info = await asyncio.shield(proto.hello)
    except BaseException:  # failed, timed out or cancelled: never leave the connection behind
        proto.close("handshake failed")
        raise
    return RelayLink(proto, "upgrade", info)


async def _connect_ws(
    url: str,
    hello: _Hello,
    on_packet: PacketHandler,
    on_gone: Callable[[bytes], None],
    ssl_context: ssl.SSLContext | None,
) -> RelayLink:
    from websockets.asyncio.client import connect as ws_connect

    _, _, tls, _ = _split(url)
    ws = await ws_connect(
        relay.websocket_url(url, relay.WS_PATH),
        max_size=relay.MAX_WS_MESSAGE,
        compression=None,
        ssl=(ssl_context or ssl.create_default_context()) if tls else None,
    )
    _tune(ws.transport.get_extra_info("socket"))
    link = _WsLink(on_packet, on_gone, hello, ws)  # the hello goes out when the challenge comes in
    link.peer_ip = _peer_ip(ws.transport)
    try:
        info = await asyncio.shield(link.hello)
    except BaseException:  # failed, timed out or cancelled: never leave the websocket behind
        link.close("handshake failed")
        raise
    return RelayLink(link, "websocket", info)
