"""The resolver's asyncio shell: UDP and TCP (RFC 7766) on the resolver address, answers from
:func:`meshd.dns.zone.answer`.

:meth:`Resolver.serve` binds both sockets and runs until cancelled; the daemon runs it supervised, so a
bind that fails (the address not yet on the interface, port 53 taken by another daemon in the same
network namespace) is retried with backoff and ``address`` stays None meanwhile (``self.dns`` in
``meshd status`` is null until the resolver answers). :attr:`Resolver.zone` is swapped whole by the map
applier; every query reads the current one, so a change answers correctly as soon as the map is applied.

TCP is bounded: at most ``MAX_TCP`` connections at once (more are closed at accept), each closed after
``TCP_IDLE`` seconds without a complete query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import cast

from meshd.dns import zone as dnszone
from meshd.supervise import Transient

log = logging.getLogger("meshd.dns")

MAX_TCP = 32
TCP_IDLE = 10.0
#: seconds after the resolver first answers before dnspython is imported in a thread: past the first
#: map and handshakes of a start-up, which it would slow down (~40 ms of CPU, issue 15); a query that
#: comes sooner imports it itself
WARM_AFTER = 3.0


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: Resolver) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        reply = dnszone.answer(data, self.owner.zone)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns udp: %s", exc)


class ResolverBindError(Transient):
    """The resolver's address cannot be bound (yet, or any more): the supervisor retries, one log line."""


class Resolver:
    """Answers for the mesh on ``host:port`` over UDP and TCP."""

    def __init__(self, host: str, port: int, zone: dnszone.Zone) -> None:
        self.host = host
        self.port = port
        self.zone = zone
        self.address: str | None = None  #: "IP" (port 53) or "IP:PORT" while answering, else None
        self._tcp_open = 0

    async def serve(self) -> None:
        """Bind UDP and TCP and answer until cancelled (OSError when a bind fails: the supervisor retries)."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self.host, self.port), family=socket.AF_INET
            )
        except OSError as e:  # the mesh interface (with our address) is being made or torn down
            raise ResolverBindError(f"resolver cannot bind {self.host}:{self.port}: {e.strerror or e}") from e
        try:
            server = await asyncio.start_server(
                self._tcp, self.host, self.port, family=socket.AF_INET, reuse_address=True
            )
        except OSError as e:
            transport.close()
            what = f"resolver cannot bind TCP {self.host}:{self.port}"
            raise ResolverBindError(f"{what}: {e.strerror or e}") from e
        except BaseException:
            transport.close()
            raise
        self.address = self.host if self.port == 53 else f"{self.host}:{self.port}"
        log.info("resolver answering on %s", self.address)
        try:
            async with server:
                if not dnszone.warmed():
                    await asyncio.sleep(WARM_AFTER)
                    await loop.run_in_executor(None, dnszone.warm)
                await asyncio.Event().wait()
        finally:
            self.address = None
            transport.close()

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_open >= MAX_TCP:
            writer.close()
            return
        self._tcp_open += 1
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    query = await reader.readexactly(size)
                reply = dnszone.answer(query, self.zone, tcp=True)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
