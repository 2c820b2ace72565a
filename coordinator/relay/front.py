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

A connection owes the server bytes again later, and is held to the same deadline and counted against the
same caps then (:func:`guarded_protocol`, a subclass of uvicorn's protocol): the next request head on a
keep-alive connection (from the previous response; uvicorn cancels its keep-alive timer on any byte and
never re-arms it, so one byte and silence held a connection forever), a request body still to come (the
app's ``BodyLimit`` answers 408 at the deadline; this is the backstop a second later) and a relay
WebSocket until its CLIENT_HELLO (:mod:`coordinator.relay.ws` is told through the ASGI scope's state).
With TLS the front takes the plain TCP connection and runs the handshake itself (``loop.start_tls``), so
a connection that never sends its ClientHello is pre-auth too (uvicorn's own ``ssl=`` handshook before
any protocol of ours saw the connection, outside the caps, for asyncio's 60 s).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Callable, Coroutine, Generator
from typing import Any, cast

from coordinator.relay.hub import WRITE_HIGH, ClientConn, RelayHub
from meshd.proto import relay

log = logging.getLogger("coordinator.relay")

#: defaults of the settings ``preauth_timeout``, ``preauth_max`` and ``preauth_max_per_source``
PREAUTH_TIMEOUT = 5.0
PREAUTH_MAX = 1024
PREAUTH_MAX_PER_SOURCE = 64
#: the ASGI scope state key (``scope["state"]``) of a relay WebSocket's callback ``done(authenticated)``:
#: call it once, when the client authenticated (it stops counting as pre-auth) or when the handler ends
#: without that (then the connection is closed at once: a client that never spoke is owed no WebSocket
#: close handshake, which uvicorn would wait 10 s for)
WS_PREAUTH_DONE = "meshvpn.preauth_done"
#: the protocol's own deadline for a request body or a relay WebSocket's CLIENT_HELLO comes this long after
#: the app's (BodyLimit's 408, the WebSocket's CLOSE), so that those answers go out first
BACKSTOP = 1.0


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
        #: per source, its spare connections (see admit), oldest first
        self.spare: dict[str, dict[int, None]] = {}
        self.refused = 0  #: connections closed because a cap was reached
        self.timed_out = 0  #: connections closed by the deadline

    def admit(self, key: int, source: str, transport: asyncio.BaseTransport, spare: bool = False) -> bool:
        """Count a new connection; False (and nothing counted) when its source is at its cap. A `spare`
        connection (a keep-alive connection that has not begun its next request) is closed first when its
        source reaches the cap: a client just opens a new one, and many clients behind one NAT, each with an
        idle keep-alive connection, must not lock each other out."""
        if self.per_source[source] >= self.max_per_source:
            spares = self.spare.get(source)
            if not spares:
                self.refused += 1
                return False
            self._close(next(iter(spares)))
        while len(self.conns) >= self.max_total:
            # the oldest is the likeliest to be idle; a legitimate client is done within the deadline
            self._close(next(iter(self.conns)))
            self.refused += 1
        self.conns[key] = (source, transport)
        self.per_source[source] += 1
        if spare:
            self.spare.setdefault(source, {})[key] = None
        return True

    def _close(self, key: int) -> None:
        _, victim = self.conns[key]
        self.release(key)
        victim.close()

    def busy(self, key: int) -> None:
        """A spare connection began a request: it counts fully now."""
        entry = self.conns.get(key)
        if entry is not None:
            self._unspare(entry[0], key)

    def _unspare(self, source: str, key: int) -> None:
        spares = self.spare.get(source)
        if spares is not None:
            spares.pop(key, None)
            if not spares:
                del self.spare[source]

    def release(self, key: int) -> None:
        entry = self.conns.pop(key, None)
        if entry is None:
            return
        source = entry[0]
        self._unspare(source, key)
        self.per_source[source] -= 1
        if self.per_source[source] <= 0:
            del self.per_source[source]


class _Resumed:
    """Awaitable that continues a coroutine whose first step ran already, from what that step yielded
    (what ``await coro`` would do after the first ``send``)."""

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        value = self.first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # cancellation (or any throw) goes on into the coroutine
                try:
                    value = self.coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = self.coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def eager_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
    """Run `coro` up to its first suspension now, the rest as a task (Python 3.12's eager tasks, for
    3.11 and uvloop): what the first step does happens before the caller returns."""
    try:
        first = coro.send(None)
    except StopIteration:
        done = loop.create_future()
        done.set_result(None)
        return done

    async def rest() -> None:
        await _Resumed(coro, first)

    return loop.create_task(rest())


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


def guarded_protocol(inner_cls: type[Any], limits: PreAuth) -> type[Any]:
    """uvicorn's HTTP protocol class `inner_cls` (h11 or httptools: both keep the request in ``self.cycle``
    with ``more_body`` and ``response_complete``), held to the pre-auth deadline and caps whenever the
    client owes bytes after the head the front handed over:

    - ``head``: from each response's end until the next request head is complete (the deadline counts
      from the response, not from the last byte);
    - ``body``: while the app waits for a request body (the app's BodyLimit answers 408 at the deadline;
      this closes the connection :data:`BACKSTOP` later should the app not);
    - ``ws``: a WebSocket upgrade to the relay path until its CLIENT_HELLO (told by the handler).
    """

    class Guarded(inner_cls):  # type: ignore[misc]
        _pa_phase: str | None = None
        _pa_timer: asyncio.TimerHandle | None = None
        _pa_upgraded = False

        def data_received(self, data: bytes) -> None:
            limits.busy(id(self))  # a spare keep-alive connection began its next request
            super().data_received(data)
            self._pa_update(rearm=False)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._pa_update(rearm=True)  # a new wait for the next head starts now

        def connection_lost(self, exc: Exception | None) -> None:
            self._pa_release()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self, *args: Any) -> None:
            self._pa_upgraded = True
            if self.scope is not None and self.scope.get("path") == relay.WS_PATH:
                # the WebSocket protocol copies app_state into its scope's state: a per-connection copy
                state: dict[str, Any] = self.app_state  # type: ignore[has-type]
                self.app_state = {**state, WS_PREAUTH_DONE: self._pa_ws_done}
                tune_socket(self.transport)  # a relay connection like an Upgrade one
                self._pa_hold("ws", limits.timeout + BACKSTOP, rearm=True)
            else:
                self._pa_release()  # a map stream authenticates in its handshake
            super().handle_websocket_upgrade(*args)

        def _pa_ws_done(self, authenticated: bool) -> None:
            self._pa_release()
            if not authenticated:
                self.transport.close()

        def _pa_update(self, rearm: bool) -> None:
            if self._pa_upgraded:
                return
            if self.transport is None or self.transport.is_closing():
                self._pa_release()
                return
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                # spare while nothing of the next request came (rearm: right after a response)
                self._pa_hold("head", limits.timeout, rearm, spare=rearm)
            elif cycle.more_body:
                self._pa_hold("body", limits.timeout + BACKSTOP, rearm=False)
            else:
                self._pa_release()  # a whole request in: the app has it

        def _pa_hold(self, phase: str, timeout: float, rearm: bool, spare: bool = False) -> None:
            if id(self) not in limits.conns:
                peername = self.transport.get_extra_info("peername")
                source = str(peername[0]) if peername else "?"
                if not limits.admit(id(self), source, self.transport, spare):
                    self._pa_phase = None
                    self.transport.close()  # over its source's cap: between requests, a clean close
                    return
            if rearm or phase != self._pa_phase or self._pa_timer is None:
                if self._pa_timer is not None:
                    self._pa_timer.cancel()
                self._pa_timer = asyncio.get_running_loop().call_later(timeout, self._pa_expired)
            self._pa_phase = phase

        def _pa_release(self) -> None:
            if self._pa_timer is not None:
                self._pa_timer.cancel()
                self._pa_timer = None
            self._pa_phase = None
            limits.release(id(self))

        def _pa_expired(self) -> None:
            self._pa_timer = None
            if id(self) in limits.conns:
                limits.timed_out += 1
            self._pa_release()
            if self._pa_upgraded:
                self.transport.abort()  # no WebSocket close handshake owed to a client that never spoke
            else:
                self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{inner_cls.__name__}"
    return Guarded


def front_protocol(
    hub: RelayHub | None, preauth: PreAuth | None = None, tls: ssl.SSLContext | None = None
) -> type[asyncio.Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)``; uvicorn instantiates it per connection with
    ``(config=, server_state=, app_state=)`` exactly like its own classes. With `tls`, it takes the plain
    TCP connection (uvicorn must not have ``ssl=``) and handshakes within the pre-auth deadline."""
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
            self.handshake: asyncio.Future[None] | None = None  #: the TLS handshake (with `tls`)
            #: until start_tls returned: plaintext may come before, and must go out on the TLS transport
            self.tls_pending = tls is not None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
            peername = transport.get_extra_info("peername")
            source = str(peername[0]) if peername else "?"
            if not limits.admit(id(self), source, transport):
                transport.abort()  # RST: nothing of ours is owed to a source over its cap
                return
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(limits.timeout, self._expired)
            if tls is not None:
                # start_tls's first step (pause reading, put its TLS protocol on the transport) must run
                # now: uvloop starts reading right after connection_made, and a ClientHello read by this
                # protocol is lost to the handshake (half of all handshakes failed that way)
                self.handshake = eager_task(loop, self._start_tls(loop, transport))

        async def _start_tls(self, loop: asyncio.AbstractEventLoop, raw: asyncio.Transport) -> None:
            """Handshake inside the pre-auth deadline (the front's timer aborts `raw` at the deadline too,
            which ends the handshake with an error here)."""
            assert tls is not None
            try:
                wrapped = await loop.start_tls(
                    raw, self, tls, server_side=True, ssl_handshake_timeout=limits.timeout
                )
            except Exception as exc:  # a failed handshake, a reset, the deadline: the connection is gone
                log.debug("TLS handshake failed: %r", exc)
                self._done()
                raw.abort()
                return
            if wrapped is None:  # closed meanwhile
                self._done()
                return
            self.transport = wrapped
            self.tls_pending = False
            if self.buf:  # the request came with the handshake's last flight
                self._scan()

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
            if self.tls_pending:
                return  # the handshake's end, before start_tls returned the TLS transport: see _start_tls
            self._scan()

        def _scan(self) -> None:
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


def install(
    config: Any, hub: RelayHub | None, preauth: PreAuth | None = None, tls: ssl.SSLContext | None = None
) -> None:
    """Put the front before uvicorn's HTTP protocol on `config` (a ``uvicorn.Config``); also without a
    relay (`hub` None), for the pre-auth deadline and caps. With `tls` the front does TLS itself (give
    uvicorn no certificate then)."""
    if not config.loaded:
        config.load()
    limits = preauth or PreAuth()
    config.http_protocol_class_inner = guarded_protocol(config.http_protocol_class, limits)
    config.http_protocol_class = front_protocol(hub, limits, tls)


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """The server's TLS context (what uvicorn's ``ssl_certfile``/``ssl_keyfile`` made, with the standard
    library's defaults: TLS 1.2 or later)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx
