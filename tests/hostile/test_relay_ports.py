"""Hostile: a third party cannot use another pair's UDP relay ports (issue 14).

The relay's real UDP port shell (coordinator/relay/udp.py) on loopback, two honest nodes that bound
their ports and a third one, mallory, that knows both port numbers and has seen the honest binds go by.
It sends WireGuard-shaped packets from its own address, binds without the secret, with the other side's
secret, replays a captured bind, and asks for a pair the other side never asked for. The positive
control: the honest pair's packets still cross, both ways, after every attempt.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket

import pytest
from prometheus_client import CollectorRegistry

from coordinator.relay.hub import ClientConn, RelayHub, RelayMetrics
from coordinator.relay.udp import UdpPorts
from meshd.proto import relay, relayport
from meshd.proto.ticket import TicketError, TicketPayload

pytestmark = pytest.mark.hostile

A, B, M = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
WG_DATA = bytes([4, 0, 0, 0]) + os.urandom(60)  #: shaped like a WireGuard transport message


class _Conn(ClientConn):
    """An authenticated relay session whose frames we read instead of sending."""

    def __init__(self, hub: RelayHub, key: bytes, node_id: int) -> None:
        super().__init__(hub, "test")
        self.key, self.node_id = key, node_id
        hub.clients[key] = self
        self.frames: list[relay.Frame] = []
        self.decoder_out = relay.FrameDecoder()

    def _write(self, data: bytes) -> None:
        self.frames += self.decoder_out.feed(data)

    def _close_transport(self) -> None:
        pass

    def grant(self) -> relayport.Grant | None:
        got = [relayport.decode_grant(f.payload) for f in self.frames if f.type == relay.FrameType.PORT_GRANT]
        return got[-1] if got else None


def _refuse(data: bytes, now: float) -> TicketPayload:
    raise TicketError("not used here")


def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


async def _recv(sock: socket.socket, within: float = 0.5) -> bytes | None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            return await loop.sock_recv(sock, 2048)
    except TimeoutError:
        return None


async def _drain(sock: socket.socket) -> None:
    while await _recv(sock, 0.05) is not None:
        pass


async def test_a_third_node_cannot_use_another_pairs_ports() -> None:
    hub = RelayHub("default", 1, _refuse, RelayMetrics(CollectorRegistry()))
    base = random.randrange(42000, 60000)
    ports = UdpPorts(hub, "127.0.0.1", range(base, base + 10))
    hub.ports = ports
    a, b, m = _Conn(hub, A, 1), _Conn(hub, B, 2), _Conn(hub, M, 3)
    sa, sb, sm = _udp(), _udp(), _udp()
    try:
        # mallory asks for a pair with A, who never asked for one with mallory: nothing is allocated
        ports.request(m, A)
        ports.request(a, B)
        ports.request(b, A)
        ga, gb = a.grant(), b.grant()
        assert ga is not None and gb is not None and m.grant() is None
        assert ports.allocations == 1
        await asyncio.sleep(0.05)  # the port sockets attach to the loop
        binds = {}
        for sock, g in ((sa, ga), (sb, gb)):
            binds[g.port] = relayport.encode_bind(g.secret, g.port, 1)
            sock.sendto(binds[g.port], ("127.0.0.1", g.port))
        await asyncio.sleep(0.05)

        async def honest_pair_works() -> None:
            sa.sendto(WG_DATA, ("127.0.0.1", ga.port))
            assert await _recv(sb) == WG_DATA
            sb.sendto(WG_DATA, ("127.0.0.1", gb.port))
            assert await _recv(sa) == WG_DATA

        await honest_pair_works()  # the positive control

        # 1. WireGuard-shaped packets from mallory's (unbound) address: dropped, both ports
        for port in (ga.port, gb.port):
            sm.sendto(WG_DATA, ("127.0.0.1", port))
        assert await _recv(sa, 0.3) is None and await _recv(sb, 0.3) is None
        # 2. binds without the secret, with the other side's secret, and a replay of A's own bind
        attempts = [
            relayport.encode_bind(os.urandom(16), ga.port, 99),
            relayport.encode_bind(gb.secret, ga.port, 99),
            binds[ga.port],
            os.urandom(relayport.BIND_LEN),
        ]
        for data in attempts:
            sm.sendto(data, ("127.0.0.1", ga.port))
        await asyncio.sleep(0.1)
        side_a = ports.core.by_port[ga.port]
        assert side_a.addr == sa.getsockname()
        sm.sendto(WG_DATA, ("127.0.0.1", ga.port))
        assert await _recv(sb, 0.3) is None
        # nothing reached mallory either: the relay only ever sends to the two bound addresses
        assert await _recv(sm, 0.2) is None
        assert ports.core.bad_binds >= 3  # the three bind-shaped attempts (random bytes are no bind)
        await _drain(sa)
        await _drain(sb)
        await honest_pair_works()
        # 3. A's session ends (removed node, rotated key): its pair ends with it, ports closed
        hub.unregister(a, "removed")
        assert ports.allocations == 0
        sb.sendto(WG_DATA, ("127.0.0.1", gb.port))
        assert await _recv(sa, 0.3) is None
    finally:
        ports.close("test over")
        for s in (sa, sb, sm):
            s.close()
