"""One connection to one relay region: HTTP Upgrade (RFC 9110 §7.8) first, WebSocket as fallback.

The link speaks :mod:`meshd.proto.relay`: CLIENT_HELLO (key, home flag, ticket) right after the request
(pipelined: one round trip to a working relay), SERVER_HELLO back, then SEND_PACKET out and RECV_PACKET in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from meshd.proto import relay
from meshd.proto.relay import FrameType, RelayProtocolError

log = logging.getLogger("meshd.relay")

SOCK_BUF = 4 << 20
CONNECT_TIMEOUT = 5.0
PENDING_MAX = 64  #: packets held while the link is connecting (a WireGuard handshake must not be lost)


class RelayLinkError(Exception):
    """Connecting to or talking with a relay failed; the message says how."""


PacketHandler = Callable[[bytes, bytes], None]  #: (src key, packet)


def _tune(sock: socket.socket | None) -> None:
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Base:
    """What both transports share: frame dispatch, hello handshake, ping/pong."""

    def __init__(self, on_packet: PacketHandler, on_gone: Callable[[bytes], None]) -> None:
        self.on_packet = on_packet
        self.on_gone = on_gone
        self.decoder = relay.FrameDecoder()
        self.hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pings: dict[bytes, asyncio.Future[float]] = {}
        self.last_rx = time.monotonic()
        self.tx_bytes = 0
        self.rx_bytes = 0

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self, reason: str) -> None:
        raise NotImplementedError

    def _frames(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            frames = self.decoder.feed(data)
        except RelayProtocolError as exc:
            self.close(f"relay broke the framing: {exc}")
            return
        for f in frames:
            t = f.type
            if t == FrameType.RECV_PACKET:
                p = f.payload
                self.rx_bytes += len(p) - 32
                self.on_packet(p[:32], p[32:])
            elif t == FrameType.SERVER_HELLO:
                try:
                    info = json.loads(f.payload or b"{}")
                except ValueError:
                    info = {}
                if not self.hello.done():
                    self.hello.set_result(info if isinstance(info, dict) else {})
            elif t == FrameType.PONG:
                fut = self.pings.pop(f.payload, None)
                if fut is not None and not fut.done():
                    fut.set_result(time.monotonic())
            elif t == FrameType.PEER_GONE:
                self.on_gone(f.key)
            elif t == FrameType.CLOSE:
                self.close("relay closed the connection: " + f.payload.decode("utf-8", "replace"))
                return

    def _lost(self, reason: str) -> None:
        if not self.hello.done():
            self.hello.set_exception(RelayLinkError(reason))
        if not self.closed.done():
            self.closed.set_result(reason)
        for fut in self.pings.values():
            if not fut.done():
                fut.cancel()


class _UpgradeProtocol(_Base, asyncio.Protocol):
    def __init__(self, on_packet: PacketHandler, on_gone: Callable[[bytes], None], request: bytes) -> None:
        _Base.__init__(self, on_packet, on_gone)
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=SOCK_BUF)
        _tune(transport.get_extra_info("socket"))
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self._frames(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > 16384:
                self.close("relay answered with an oversized HTTP head")
            return
        status = bytes(self.head[: self.head.find(b"\r\n")]).decode("latin-1")
        if not status.startswith("HTTP/1.1 101"):
            self.close(f"relay refused the upgrade: {status.strip()}")
            return
        self.upgraded = True
        rest = bytes(self.head[end + 4 :])
        self.head.clear()
        if rest:
            self._frames(rest)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.tx_bytes += len(data)
            self.transport.write(data)

    def close(self, reason: str) -> None:
        self._lost(reason)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc}" if exc else "relay closed the connection")


class _WsLink(_Base):
    def __init__(self, on_packet: PacketHandler, on_gone: Callable[[bytes], None], ws: Any) -> None:
        super().__init__(on_packet, on_gone)
        self.ws = ws
        self.out: list[bytes] = []
        self.wake = asyncio.Event()
        self.tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._writer())]

    async def _reader(self) -> None:
        try:
            async for msg in self.ws:
                if isinstance(msg, str):
                    self.close("relay sent a text message")
                    return
                self._frames(msg)
        except Exception as exc:
            self._lost(f"websocket: {exc}")
        self._lost("relay closed the websocket")

    async def _writer(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.out:
                    batch = b"".join(self.out)
                    self.out.clear()
                    await self.ws.send(batch)
        except Exception as exc:
            self._lost(f"websocket: {exc}")

    def write(self, data: bytes) -> None:
        self.tx_bytes += len(data)
        self.out.append(data)
        self.wake.set()

    def close(self, reason: str) -> None:
        self._lost(reason)
        for t in self.tasks:
            t.cancel()
        asyncio.get_running_loop().create_task(self.ws.close())


class RelayLink:
    """A connected relay link. Use :func:`connect`."""

    def __init__(self, impl: _Base, transport: str, info: dict[str, Any]) -> None:
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

    def send_packet(self, dst: bytes, packet: bytes) -> None:
        # header + key + packet in one write; no intermediate Frame objects on the hot path
        self._impl.write(relay.HEADER.pack(FrameType.SEND_PACKET, 32 + len(packet)) + dst + packet)

    def renew(self, key: bytes, ticket: bytes, home: bool) -> None:
        self._impl.write(relay.client_hello(key, ticket, home))

    def keepalive(self) -> None:
        self._impl.write(relay.encode(FrameType.KEEPALIVE))

    async def ping(self, within: float = 2.0) -> float:
        """Round-trip time of one relay PING, in seconds."""
        token = os.urandom(8)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._impl.pings[token] = fut
        start = time.monotonic()
        self._impl.write(relay.encode(FrameType.PING, token))
        try:
            return (await asyncio.wait_for(fut, within)) - start
        except (TimeoutError, asyncio.CancelledError):
            raise RelayLinkError("relay did not answer a ping") from None
        finally:
            self._impl.pings.pop(token, None)

    def close(self, reason: str = "closed by meshd") -> None:
        if self.is_open:
            with contextlib.suppress(Exception):
                self._impl.write(relay.encode(FrameType.CLOSE, reason.encode()[:1024]))
        self._impl.close(reason)

    @property
    def stats(self) -> tuple[int, int]:
        return self._impl.rx_bytes, self._impl.tx_bytes


async def connect(
    url: str,
    key: bytes,
    ticket: bytes,
    *,
    home: bool,
    on_packet: PacketHandler,
    on_gone: Callable[[bytes], None] = lambda k: None,
    ssl_context: ssl.SSLContext | None = None,
    within: float = CONNECT_TIMEOUT,
    transports: tuple[str, ...] = ("upgrade", "websocket"),
) -> RelayLink:
    """Connect to the relay at `url` (the region's http(s) URL): Upgrade first, then WebSocket."""
    errors = []
    for kind in transports:
        try:
            if kind == "upgrade":
                return await asyncio.wait_for(
                    _connect_upgrade(url, key, ticket, home, on_packet, on_gone, ssl_context), within
                )
            return await asyncio.wait_for(
                _connect_ws(url, key, ticket, home, on_packet, on_gone, ssl_context), within
            )
        except (OSError, RelayLinkError, TimeoutError, ssl.SSLError) as exc:
            errors.append(f"{kind}: {exc or type(exc).__name__}")
        except Exception as exc:  # websockets' own errors
            errors.append(f"{kind}: {exc or type(exc).__name__}")
    raise RelayLinkError(f"cannot connect to relay {url} ({'; '.join(errors)})")


def _split(url: str) -> tuple[str, int, bool, str]:
    u = urlsplit(url)
    tls = u.scheme == "https"
    if u.scheme not in ("http", "https") or not u.hostname:
        raise RelayLinkError(f"bad relay URL {url!r}")
    return u.hostname, u.port or (443 if tls else 80), tls, u.netloc


async def _connect_upgrade(
    url: str,
    key: bytes,
    ticket: bytes,
    home: bool,
    on_packet: PacketHandler,
    on_gone: Callable[[bytes], None],
    ssl_context: ssl.SSLContext | None,
) -> RelayLink:
    host, port, tls, netloc = _split(url)
    request = (
        f"GET /api/v1/relay HTTP/1.1\r\nHost: {netloc}\r\nUpgrade: meshrelay\r\nConnection: Upgrade\r\n\r\n"
    ).encode() + relay.client_hello(key, ticket, home)
    loop = asyncio.get_running_loop()
    ctx = (ssl_context or ssl.create_default_context()) if tls else None
    _, proto = await loop.create_connection(
        lambda: _UpgradeProtocol(on_packet, on_gone, request), host, port, ssl=ctx
    )
    try:
        info = await asyncio.shield(proto.hello)
    except BaseException:
        proto.close("handshake failed")
        raise
    return RelayLink(proto, "upgrade", info)


async def _connect_ws(
    url: str,
    key: bytes,
    ticket: bytes,
    home: bool,
    on_packet: PacketHandler,
    on_gone: Callable[[bytes], None],
    ssl_context: ssl.SSLContext | None,
) -> RelayLink:
    from websockets.asyncio.client import connect as ws_connect

    _, _, tls, _ = _split(url)
    ws_url = "ws" + url.rstrip("/")[len("http") :] + "/api/v1/relay/ws"
    ws = await ws_connect(
        ws_url,
        max_size=None,
        compression=None,
        ssl=(ssl_context or ssl.create_default_context()) if tls else None,
    )
    _tune(ws.transport.get_extra_info("socket"))
    link = _WsLink(on_packet, on_gone, ws)
    link.write(relay.client_hello(key, ticket, home))
    try:
        info = await asyncio.shield(link.hello)
    except BaseException:
        link.close("handshake failed")
        raise
    return RelayLink(link, "websocket", info)
