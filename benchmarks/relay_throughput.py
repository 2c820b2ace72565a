"""Relay throughput and soak with simulated relay clients speaking the real protocol (loopback only).

Starts a relay hub behind the real front (HTTP Upgrade on a uvicorn port) in this process, connects
2*PAIRS real meshd RelayLinks with real signed tickets, and has every client send 1300-byte packets to its
partner for DURATION seconds (bounded). Prints delivered packets and Mbit/s, drop counters (queue policy,
unknown peer) and the process RSS (server and clients share this process: an upper bound for the relay).
NOT YET HERE: iperf3 over a relayed wireguard-go pair versus a direct pair (see the report).

    .venv/bin/python benchmarks/relay_throughput.py --pairs 200 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import time

import uvicorn
from fastapi import FastAPI
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry

from coordinator.relay.front import install
from coordinator.relay.hub import RelayHub, RelayMetrics
from meshd.proto import ticket
from meshd.proto.encoding import b64encode
from meshd.relay import link as rlink


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main(pairs: int, duration: float, size: int, rate: int) -> None:
    seed = os.urandom(32)
    pub = bytes(SigningKey(seed).verify_key)
    hub = RelayHub("bench", 1, lambda t, now: ticket.verify(t, [pub], now), RelayMetrics(CollectorRegistry()))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(FastAPI(), log_level="warning", lifespan="off", backlog=4096)
    install(config, hub)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):  # bounded: uvicorn has no "started" event
        if server.started:
            break
        await asyncio.sleep(0.01)
    received = [0]

    def on_packet(src: bytes, pkt: bytes) -> None:
        received[0] += 1

    keys = [os.urandom(32) for _ in range(2 * pairs)]
    links = []
    t0 = time.monotonic()
    for i, k in enumerate(keys):
        t = ticket.make(i + 1, b64encode(k), seed, time.time()).encode()
        links.append(await rlink.connect(url, k, t, home=True, on_packet=on_packet))
    print(f"{len(links)} clients connected in {time.monotonic() - t0:.2f} s; RSS {rss_mib():.1f} MiB")
    payload = os.urandom(size)
    sent = 0
    end = time.monotonic() + duration
    interval = 0.01
    per_tick = max(1, rate * pairs * 2 // 100)  # packets per 10 ms across all clients
    while time.monotonic() < end:
        tick = time.monotonic()
        for j in range(per_tick):
            i = (sent + j) % len(links)
            links[i].send_packet(keys[i ^ 1], payload)
        sent += per_tick
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - tick)))
    await asyncio.sleep(1.0)
    hub.flush_counts()
    drops_queue = sum(c.drops for c in hub.conns)
    mbit = received[0] * size * 8 / duration / 1e6
    print(
        f"pairs {pairs}, {duration:.0f} s, {size} B packets: sent {sent}, delivered {received[0]} "
        f"({100 * received[0] / max(1, sent):.2f} %), {mbit:.1f} Mbit/s delivered"
    )
    print(f"queue drops (drop-oldest policy): {drops_queue}; relay RSS (incl. clients) {rss_mib():.1f} MiB")
    for ln in links:
        ln.close()
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 5)
    sock.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--size", type=int, default=1300)
    ap.add_argument("--rate", type=int, default=50, help="packets/s per client")
    a = ap.parse_args()
    asyncio.run(main(a.pairs, min(a.duration, 600.0), a.size, a.rate))
