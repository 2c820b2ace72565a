"""One port for the API and the relay: an asyncio Protocol in front of uvicorn's HTTP protocol.

uvicorn (ASGI) cannot hand an upgraded raw socket to an app, so the front reads the first request head
itself. ``GET /api/v1/relay`` with ``Upgrade: meshrelay`` is answered ``101 Switching Protocols`` (RFC 9110
§7.8, RFC 9112 §9) and the connection becomes a :class:`TcpClient`; any other request is handed, bytes and
transport, to a fresh instance of uvicorn's own protocol class (what ``uvicorn.Server.startup`` would have
created), so plain HTTP, WebSocket streams and TLS (the transport is already TLS-wrapped) work unchanged.
Used via ``uvicorn.Config(http=front_protocol(hub))``.

The front is also where unauthenticated connections are bounded (issue 13: 20,000 idle ``Upgrade:
meshrelay`` sockets took the API down and nothing closed them). From accept until either a complete HTTP
request head is handed to uvicorn or a relay client's CLIENT_HELLO is accepted, a connection is *pre-auth*:
it must get there within ``PreAuth.timeout`` seconds (a head dribbled byte by byte counts from accept, so
slowloris clients are closed too), and at most ``max_total`` such connections (oldest closed first, so a
flood cannot lock out a new legitimate client) and ``max_per_source`` per source address (the newest is
refused) are held.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from coordinator.relay.hub import WRITE_HIGH, ClientConn, RelayHub
from meshd.proto import relay

log = logging.getLogger("coordinator.relay")

#: defaults of the settings ``preauth_timeout``, ``preauth_max`` and ``preauth_max_per_source``
PREAUTH_TIMEOUT = 5.0
PREAUTH_MAX = 1024
PREAUTH_MAX_PER_SOURCE = 64


class PreAuth:
    """Accounting of the connections that have not yet sent a request head or a CLIENT_HELLO."""

    def __init__(
        self,
        timeout: float = PREAUTH_TIMEOUT,
        max_total: int = PREAUTH_MAX,
        max_per_source: int = PREAUTH_MAX_PER_SOURCE,
    ) -> None:
        self.timeout = timeout
        self.max_total = max_total
        self.max_per_source = max_per_source
        #: insertion-ordered, so the first entry is the oldest pre-auth connection
        self.conns: dict[int, tuple[str, asyncio.BaseTransport]] = {}
        self.per_source: collections.Counter[str] = collections.Counter()
        self.refused = 0  #: connections closed because a cap was reached
        self.timed_out = 0  #: connections closed by the deadline

    def admit(self, key: int, source: str, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection; False (and nothing counted) when its source is at its cap."""
        if self.per_source[source] >= self.max_per_source:
            self.refused += 1
            return False
        while len(self.conns) >= self.max_total:
            # the oldest is the likeliest to be idle; a legitimate client is done within the deadline
            oldest = next(iter(self.conns))
            _, victim = self.conns[oldest]
            self.release(oldest)
            self.refused += 1
            victim.close()
        self.conns[key] = (source, transport)
        self.per_source[source] += 1
        return True

    def release(self, key: int) -> None:
        entry = self.conns.pop(key, None)
        if entry is None:
            return
        source = entry[0]
        self.per_source[source] -= 1
        if self.per_source[source] <= 0:
            del self.per_source[source]


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

    def __init__(
        self,
        hub: RelayHub,
        transport: asyncio.Transport,
        peer: str,
        on_event: Callable[[], None] | None = None,
    ) -> None:
        ClientConn.__init__(self, hub, peer)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        #: told after each read and on close while pre-auth, so the front can stop counting it
        self.on_event = on_event

    def _tell(self) -> None:
        if self.on_event is not None and (self.key is not None or self.closed):
            cb, self.on_event = self.on_event, None
            cb()

    def _write(self, data: bytes) -> None:
        self.transport.write(data)

    def _write_parts(self, parts: list[bytes | memoryview]) -> None:
        self.transport.writelines(parts)  # one send (uvloop: writev) for the whole batch

    def _close_transport(self) -> None:
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.feed(data)
        self._tell()

    def eof_received(self) -> bool | None:
        self.eof()
        self._tell()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(f"connection lost: {exc}" if exc else "connection closed")
        self._tell()

    def pause_writing(self) -> None:
        self.pause()

    def resume_writing(self) -> None:
        self.resume()


def front_protocol(hub: RelayHub | None, preauth: PreAuth | None = None) -> type[asyncio.Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)``; uvicorn instantiates it per connection with
    ``(config=, server_state=, app_state=)`` exactly like its own classes."""
    limits = preauth or PreAuth()

    class Front(asyncio.Protocol):
        def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
            self.config = config
            self.server_state = server_state
            self.app_state = app_state
            self.loop = _loop
            self.buf = bytearray()  #: the request head so far: past relay.MAX_HEAD it goes to uvicorn
            self.transport: asyncio.Transport | None = None
            self.timer: asyncio.TimerHandle | None = None
            self.client: TcpClient | None = None  #: after the upgrade, until its CLIENT_HELLO

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
            peername = transport.get_extra_info("peername")
            source = str(peername[0]) if peername else "?"
            if not limits.admit(id(self), source, transport):
                transport.abort()  # RST: nothing of ours is owed to a source over its cap
                return
            self.timer = asyncio.get_running_loop().call_later(limits.timeout, self._expired)

        def _expired(self) -> None:
            """The pre-auth deadline: no complete request head, or no CLIENT_HELLO after the upgrade."""
            self.timer = None
            limits.release(id(self))
            if self.client is not None:
                if self.client.key is None:
                    limits.timed_out += 1
                    self.client.close("no CLIENT_HELLO in time", tell=True)
                return
            limits.timed_out += 1
            if self.transport is not None:
                self.transport.abort()

        def _done(self) -> None:
            """Authenticated or handed to uvicorn: no longer pre-auth."""
            if self.timer:
                self.timer.cancel()
                self.timer = None
            limits.release(id(self))

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
            self._done()
            return None

        def connection_lost(self, exc: Exception | None) -> None:
            self._done()

        def _to_http(self) -> None:
            assert self.transport is not None
            self._done()
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
            # the deadline keeps running until CLIENT_HELLO: see _on_client_hello
            rest = bytes(self.buf[head_len:])
            self.buf.clear()
            peername = self.transport.get_extra_info("peername")
            peer = f"{peername[0]}:{peername[1]}" if peername else "?"
            tune_socket(self.transport)
            self.transport.write(relay.SWITCHING_PROTOCOLS)
            client = TcpClient(hub, self.transport, peer, on_event=self._relay_event)
            self.client = client
            self.transport.set_protocol(client)
            client.start()  # SERVER_CHALLENGE right after the 101
            if rest:
                client.data_received(rest)

        def _relay_event(self) -> None:
            """The relay client authenticated (or closed): the pre-auth deadline and caps are done."""
            self._done()

    return Front


def install(config: Any, hub: RelayHub | None, preauth: PreAuth | None = None) -> None:
    """Put the front before uvicorn's HTTP protocol on `config` (a ``uvicorn.Config``); also without a
    relay (`hub` None), for the pre-auth deadline and caps."""
    if not config.loaded:
        config.load()
    config.http_protocol_class_inner = config.http_protocol_class
    config.http_protocol_class = front_protocol(hub, preauth)
