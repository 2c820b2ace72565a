"""A pair's kernel forwarding is installed off the event loop (meshd/relay/portserver.py, issue 15): until
the install is done the pair's ports forward nothing in userspace and the nodes are not told the pair is
ready (so they stay on the TCP relay); a pair that ends meanwhile is told CLOSED and never READY.

The relay's real UDP port shell on loopback; the kernel forwarder is a fake whose install finishes when
the test says (the real one runs nft and conntrack on its thread: tests/netns/test_relay_udp.py)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading

from prometheus_client import CollectorRegistry

from coordinator.relay.hub import RelayHub, RelayMetrics
from coordinator.relay.udp import UdpPorts
from meshd.proto import relay, relayport
from meshd.proto.relayport import Allocation, PortFlags
from tests.hostile.test_relay_ports import _Conn, _recv, _refuse, _udp

A, B = b"\x0a" * 32, b"\x0b" * 32
WG_DATA = bytes([4, 0, 0, 0]) + os.urandom(60)


class GatedKernel:
    """Installs finish (on a thread, as the real one's) when ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.installs: list[int] = []
        self.removed: list[int] = []

    def install(self, alloc: Allocation, done: object) -> None:
        self.installs.append(alloc.a.port)

        def finish() -> None:
            self.release.wait(10)
            done()  # type: ignore[operator]

        threading.Thread(target=finish, daemon=True).start()

    def remove(self, alloc: Allocation) -> None:
        self.removed.append(alloc.a.port)

    def counters(self, alloc: Allocation) -> None:
        return None

    def close(self) -> None:
        self.release.set()


def states(conn: _Conn) -> list[PortFlags]:
    return [relayport.decode_state(f.payload)[1] for f in conn.frames if f.type == relay.FrameType.PORT_STATE]


async def bound_pair(kernel: GatedKernel) -> tuple[UdpPorts, _Conn, _Conn, socket.socket, socket.socket, int]:
    hub = RelayHub("default", 1, _refuse, RelayMetrics(CollectorRegistry()))
    base = random.randrange(42000, 60000)
    ports = UdpPorts(hub, "127.0.0.1", range(base, base + 10), kernel=kernel)
    hub.ports = ports
    a, b = _Conn(hub, A, 1), _Conn(hub, B, 2)
    sa, sb = _udp(), _udp()
    ports.request(a, B)
    ports.request(b, A)
    ga, gb = a.grant(), b.grant()
    assert ga is not None and gb is not None
    await asyncio.sleep(0.05)  # the port sockets attach to the loop
    for sock, g in ((sa, ga), (sb, gb)):
        sock.sendto(relayport.encode_bind(g.secret, g.port, 1), ("127.0.0.1", g.port))
    await asyncio.sleep(0.1)
    return ports, a, b, sa, sb, ga.port


async def test_the_nodes_hear_ready_and_packets_cross_only_once_the_kernel_install_is_done() -> None:
    kernel = GatedKernel()
    ports, a, b, sa, sb, port_a = await bound_pair(kernel)
    try:
        assert len(kernel.installs) == 1, "both sides bound: the install started"
        assert PortFlags.READY not in states(a) + states(b), "held while the kernel takes over"
        sa.sendto(WG_DATA, ("127.0.0.1", port_a))
        assert await _recv(sb, 0.3) is None, "no userspace forwarding during the install"
        kernel.release.set()
        for conn in (a, b):
            for _ in range(50):
                if PortFlags.READY in states(conn):
                    break
                await asyncio.sleep(0.01)
            assert states(conn)[-1] == PortFlags.READY
        sa.sendto(WG_DATA, ("127.0.0.1", port_a))
        assert await _recv(sb) == WG_DATA, "after it, what reaches a port is forwarded as before"
    finally:
        ports.close("test over")
        sa.close()
        sb.close()


async def test_a_pair_that_ends_during_the_install_is_told_closed_and_never_ready() -> None:
    kernel = GatedKernel()
    ports, a, b, sa, sb, _ = await bound_pair(kernel)
    try:
        a.hub.unregister(a, "removed")
        assert states(b)[-1] == PortFlags.CLOSED
        kernel.release.set()
        await asyncio.sleep(0.1)
        assert PortFlags.READY not in states(b)
        assert kernel.removed == kernel.installs, "its rules go (queued after the install)"
    finally:
        ports.close("test over")
        sa.close()
        sb.close()
