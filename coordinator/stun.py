"""The coordinator's STUN server (RFC 8489 Binding), on two UDP ports.

The second port (``stun_port + 1``) lets a client compare the mapping its NAT gives towards two
destinations: different mapped ports mean the mapping varies by destination (endpoint-dependent mapping,
RFC 4787 §4.1), so STUN-reflexive candidates will not work for it and the relay (or a port map) must.
The protocol logic is :func:`meshd.proto.stun.answer`; this is only the socket.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from typing import cast

from meshd.proto import stun
from meshd.proto.endpoint import Endpoint

log = logging.getLogger("coordinator.stun")
SOFTWARE = "meshvpn coordinator"


class StunProtocol(asyncio.DatagramProtocol):
    def __init__(self, other: Endpoint | None) -> None:
        self.other = other
        self.transport: asyncio.DatagramTransport | None = None
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # selector transports don't subclass it

    def datagram_received(self, data: bytes, addr: Endpoint) -> None:
        reply = stun.answer(data, (addr[0], addr[1]), software=SOFTWARE, other_address=self.other)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
            self.answered += 1


async def start_stun(host: str, port: int) -> list[asyncio.DatagramTransport]:
    """Answer STUN on ``host:port`` and ``host:port+1``; OSError if a port is taken."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    transports: list[asyncio.DatagramTransport] = []
    try:
        for p, other in ((port, port + 1), (port + 1, port)):
            other_addr = (host, other) if host not in ("0.0.0.0", "::") else None
            t, _ = await loop.create_datagram_endpoint(
                functools.partial(StunProtocol, other_addr), local_addr=(host, p), family=family
            )
            transports.append(t)
    except OSError:
        for t in transports:
            t.close()
        raise
    log.info("STUN on %s udp/%d and udp/%d", host, port, port + 1)
    return transports
