"""One port for the API and the relay: an asyncio Protocol in front of uvicorn's HTTP protocol.

uvicorn (ASGI) cannot hand an upgraded raw socket to an app, so the front reads the first request head
itself. ``GET /api/v1/relay`` with ``Upgrade: meshrelay`` is answered ``101 Switching Protocols`` (RFC 9110
§7.8, RFC 9112 §9) and the connection becomes a :class:`TcpClient`; any other request is handed, bytes and
transport, to a fresh instance of uvicorn's own protocol class (what ``uvicorn.Server.startup`` would have
created), so plain HTTP, WebSocket streams and TLS (the transport is already TLS-wrapped) work unchanged.
Used via ``uvicorn.Config(http=front_protocol(hub))``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from coordinator.relay.hub import WRITE_HIGH, ClientConn, RelayHub
from meshd.proto import relay

HEAD_TIMEOUT = 30.0


def tune_socket(transport: asyncio.BaseTransport) -> None:
    """The relay's socket options (:data:`meshd.proto.relay.SOCKET_OPTIONS`, best effort)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for level, opt, value in relay.SOCKET_OPTIONS:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, opt, value)


class TcpClient(ClientConn, asyncio.Protocol):
    """A relay client on a raw (possibly TLS) stream after the upgrade."""

    transport_name = "upgrade"

    def __init__(self, hub: RelayHub, transport: asyncio.Transport, peer: str) -> None:
        ClientConn.__init__(self, hub, peer)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def _write(self, data: bytes) -> None:
        self.transport.write(data)

    def _close_transport(self) -> None:
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.feed(data)

    def eof_received(self) -> bool | None:
        self.eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(f"connection lost: {exc}" if exc else "connection closed")

    def pause_writing(self) -> None:
        self.pause()

    def resume_writing(self) -> None:
        self.resume()


def front_protocol(hub: RelayHub | None) -> type[asyncio.Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)``; uvicorn instantiates it per connection with
    ``(config=, server_state=, app_state=)`` exactly like its own classes."""

    class Front(asyncio.Protocol):
        def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
            self.config = config
            self.server_state = server_state
            self.app_state = app_state
            self.loop = _loop
            self.buf = bytearray()  #: the request head so far: past relay.MAX_HEAD it goes to uvicorn
            self.transport: asyncio.Transport | None = None
            self.timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            if hub is None:
                self._to_http()
                return
            self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, transport.close)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > relay.MAX_HEAD:
                    self._to_http()  # uvicorn answers 431/400 for us
                return
            if hub is not None and relay.is_upgrade_request(bytes(self.buf[:end])):
                self._to_relay(end + 4)
            else:
                self._to_http()

        def eof_received(self) -> bool | None:
            if self.timer:
                self.timer.cancel()
            return None

        def connection_lost(self, exc: Exception | None) -> None:
            if self.timer:
                self.timer.cancel()

        def _to_http(self) -> None:
            assert self.transport is not None
            if self.timer:
                self.timer.cancel()
            inner_cls = self.config.http_protocol_class_inner
            inner = inner_cls(config=self.config, server_state=self.server_state, app_state=self.app_state)
            self.transport.set_protocol(inner)
            inner.connection_made(self.transport)
            if self.buf:
                data = bytes(self.buf)
                self.buf.clear()
                inner.data_received(data)

        def _to_relay(self, head_len: int) -> None:
            assert self.transport is not None and hub is not None
            if self.timer:
                self.timer.cancel()
            rest = bytes(self.buf[head_len:])
            self.buf.clear()
            peername = self.transport.get_extra_info("peername")
            peer = f"{peername[0]}:{peername[1]}" if peername else "?"
            tune_socket(self.transport)
            self.transport.write(relay.SWITCHING_PROTOCOLS)
            client = TcpClient(hub, self.transport, peer)
            self.transport.set_protocol(client)
            client.start()  # SERVER_CHALLENGE right after the 101
            if rest:
                client.data_received(rest)

    return Front


def install(config: Any, hub: RelayHub | None) -> None:
    """Put the front before uvicorn's HTTP protocol on `config` (a ``uvicorn.Config``)."""
    if not config.loaded:
        config.load()
    config.http_protocol_class_inner = config.http_protocol_class
    config.http_protocol_class = front_protocol(hub)
