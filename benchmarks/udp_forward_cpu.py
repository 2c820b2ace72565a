#!/usr/bin/env python3
"""CPU per packet of the UDP relay ports' userspace forwarding (issue 14), on loopback, no root.

The relay's real port shell (coordinator/relay/udp.py on meshd/relay/portserver.py) runs in this
process on the coordinator's event loop (uvloop when installed; ``MESH_EVENT_LOOP=asyncio`` for
asyncio's own); a child process binds both sides of one pair, then sends N WireGuard-shaped
1404-byte datagrams to side A's port at a paced rate while reading what side B's port forwards.
Printed: packets delivered, the relay process's CPU time per forwarded packet, and what that CPU
would carry in Mbit/s on one core. Loopback only, bounded by N and a 60 s limit.

    .venv/bin/python benchmarks/udp_forward_cpu.py --packets 200000
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import resource
import socket
import time
from multiprocessing.connection import Connection

from prometheus_client import CollectorRegistry

from coordinator.relay.hub import ClientConn, RelayHub, RelayMetrics
from coordinator.relay.udp import UdpPorts
from meshd import eventloop
from meshd.proto import relay, relayport

A, B = b"\x0a" * 32, b"\x0b" * 32
SIZE = 1404  #: a full-size WireGuard transport message on a 1500-byte link (1420 MTU + 32 - 48 header)


class _Conn(ClientConn):
    """A relay session whose frames (the port grants) we read instead of sending."""

    def __init__(self, hub: RelayHub, key: bytes, node_id: int) -> None:
        super().__init__(hub, "bench")
        self.key, self.node_id = key, node_id
        hub.clients[key] = self
        self.frames: list[relay.Frame] = []
        self._decoder = relay.FrameDecoder()

    def _write(self, data: bytes) -> None:
        self.frames += self._decoder.feed(data)

    def _close_transport(self) -> None:
        pass

    def grant(self) -> relayport.Grant:
        return [
            relayport.decode_grant(f.payload) for f in self.frames if f.type == relay.FrameType.PORT_GRANT
        ][-1]


def _peer(pipe: Connection, grants: tuple[relayport.Grant, relayport.Grant], n: int, rate: int) -> None:
    """The two nodes: bind, then blast A -> relay -> B and count what arrives."""
    ga, gb = grants
    sa, sb = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    for s in (sa, sb):
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sa.sendto(relayport.encode_bind(ga.secret, ga.port, 1), ("127.0.0.1", ga.port))
    sb.sendto(relayport.encode_bind(gb.secret, gb.port, 1), ("127.0.0.1", gb.port))
    pipe.send("bound")
    pipe.recv()  # the relay has both binds
    packet = bytes([4, 0, 0, 0]) + os.urandom(SIZE - 4)
    sb.setblocking(False)
    got, start = 0, time.monotonic()
    for i in range(n):
        sa.sendto(packet, ("127.0.0.1", ga.port))
        while True:  # read what arrived so far, and pace the sender to `rate` packets/s
            try:
                sb.recv(2048)
                got += 1
            except BlockingIOError:
                if time.monotonic() - start >= i / rate:
                    break
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            sb.recv(2048)
            got += 1
        except BlockingIOError:
            time.sleep(0.01)
    pipe.send(got)


async def _main(n: int, rate: int) -> None:
    hub = RelayHub("default", 1, lambda data, now: None, RelayMetrics(CollectorRegistry()))  # type: ignore[arg-type,return-value]
    base = random.randrange(42000, 60000)
    ports = UdpPorts(hub, "127.0.0.1", range(base, base + 10))
    hub.ports = ports
    a, b = _Conn(hub, A, 1), _Conn(hub, B, 2)
    ports.request(a, B)
    ports.request(b, A)
    here, there = multiprocessing.Pipe()
    child = multiprocessing.Process(target=_peer, args=(there, (a.grant(), b.grant()), n, rate))
    child.start()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, here.recv) == "bound"
    alloc = next(iter(ports.core.by_pair.values()))
    for _ in range(500):  # both binds reach the relay's sockets within a few loop turns
        if alloc.a.addr and alloc.b.addr:
            break
        await asyncio.sleep(0.01)
    else:
        raise SystemExit("the binds did not arrive")
    before = resource.getrusage(resource.RUSAGE_SELF)
    here.send("go")
    async with asyncio.timeout(60):
        got = await loop.run_in_executor(None, here.recv)
    after = resource.getrusage(resource.RUSAGE_SELF)
    child.join()
    ports.close("benchmark over")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    per = cpu / max(got, 1)
    print(
        f"{eventloop.name()}: {got}/{n} delivered at {rate}/s; relay CPU {cpu:.2f} s = "
        f"{per * 1e6:.1f} us/packet "
        f"(one core would forward {SIZE * 8 / per / 1e6:.0f} Mbit/s); load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=20_000, help="packets per second sent")
    args = parser.parse_args()
    eventloop.run(_main(min(args.packets, 1_000_000), args.rate))


if __name__ == "__main__":
    main()
