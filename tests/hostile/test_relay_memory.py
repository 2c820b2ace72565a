"""Relay memory is bounded in bytes: clients that never read cost the relay a fixed amount each.

N relay clients connect to the coordinator's embedded relay on loopback and then never read; a few
senders relay full-size packets to all of them as fast as they can for a few seconds. The relay's
per-client transport buffer (relay.WRITE_HIGH) and queue (relay.QUEUE_BYTES) fill and then drop the oldest
packets, so the process's RSS grows by at most N x (WRITE_HIGH + QUEUE_BYTES + per-frame overhead) plus
slack. A packet over relay.MAX_PACKET is refused: meshd drops it, and the relay closes a connection that
sends one anyway.

Kernel socket buffers are not process memory; the test shrinks them (relay.SOCKET_OPTIONS) so that the
few seconds of sending reach the relay's own buffers instead of filling 8 MiB of kernel buffer per socket.

The clients that never read are on the Upgrade transport or on the WebSocket fallback (its writer's queue
is capped in bytes too; before, in frames only: 1024 frames of up to 1.5 KiB each, about 1.5 MiB a client).

``MESHVPN_RELAY_MEMORY_OLD=1`` runs the same test with the limits of before (2048 frames of up to 64 KiB,
a 4 MiB transport buffer, no byte cap): it fails, which shows the test measures the limits.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.relay import front as relay_front
from coordinator.relay import hub as relay_hub
from coordinator.relay import ws as relay_ws
from meshd.proto import relay
from tests.coordinator.conftest import Coord, coord, core, settings  # noqa: F401 - fixtures
from tests.coordinator.test_relay import Node, enroll, relayed  # noqa: F401 - fixture

pytestmark = [pytest.mark.hostile, pytest.mark.timeout(60)]

N = 50  #: clients that never read
SENDERS = 4
SEND_SECONDS = 3.0  #: at least; then on until every client's queue has overflowed (SEND_MAX at most)
SEND_MAX = 20.0
SLACK = 32 << 20  #: interpreter, allocator fragmentation, the senders' own (bounded) buffers
MIB = 1 << 20
OLD = os.environ.get("MESHVPN_RELAY_MEMORY_OLD") == "1"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def per_client_bound() -> int:
    """What one client that never reads may cost the relay: transport buffer + queue + per-frame objects
    (a bytes object and a deque slot, ~50 bytes, for each of at most QUEUE_FRAMES frames)."""
    return relay_hub.WRITE_HIGH + relay_hub.QUEUE_BYTES + relay_hub.QUEUE_FRAMES * 64 + relay.MAX_FRAME


def _held(c: relay_hub.ClientConn) -> int:
    """Bytes the relay holds for one client: its queue and transport buffer (Upgrade), or its writer's
    queue (WebSocket: uvicorn's transport buffer is behind the ASGI interface, bounded by its high-water
    mark as uvicorn's send waits while the transport is paused)."""
    if isinstance(c, relay_ws.WsClient):
        return sum(len(frame) for frame in c.out)
    return c.queued + c.transport.get_write_buffer_size()  # type: ignore[attr-defined]


def _stop_reading(lk: Any) -> None:
    impl = lk._impl
    if hasattr(
        impl, "ws"
    ):  # WebSocket: its reader task gone, websockets stops reading once its queue is full
        impl.tasks[0].cancel()
    else:
        impl.transport.pause_reading()


@pytest.mark.parametrize("transport", ["upgrade", "websocket"])
async def test_clients_that_never_read_cost_the_relay_bounded_memory(
    relayed: Coord,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
) -> None:
    small = 16 << 10  # kernel buffers: not what this measures (see module doc)
    monkeypatch.setattr(
        relay,
        "SOCKET_OPTIONS",
        ((socket.SOL_SOCKET, socket.SO_RCVBUF, small), (socket.SOL_SOCKET, socket.SO_SNDBUF, small)),
    )
    packet_size = relay.MAX_PACKET
    per_client = per_client_bound()  #: stated with today's limits, also when OLD patches them away
    bound = N * per_client + SLACK
    held_bound = N * (relay_hub.WRITE_HIGH + relay_hub.QUEUE_BYTES + relay.MAX_FRAME + relay.HEADER_LEN)
    if OLD:  # the limits before the byte caps: frames only, 64 KiB packets, a 4 MiB transport buffer
        packet_size = 60000
        monkeypatch.setattr(relay_hub, "QUEUE_BYTES", 1 << 40)
        monkeypatch.setattr(relay_hub, "QUEUE_FRAMES", 2048)
        monkeypatch.setattr(relay_front, "WRITE_HIGH", 4 << 20)
        monkeypatch.setattr(relay_hub, "WRITE_HIGH", 4 << 20)
        monkeypatch.setattr(relay, "MAX_PACKET", 65535)
        monkeypatch.setitem(relay._LIMITS, relay.FrameType.SEND_PACKET, (relay.KEY_LEN, 65535 + 32))
        monkeypatch.setitem(relay._LIMITS, relay.FrameType.RECV_PACKET, (relay.KEY_LEN, 65535 + 32))

    t0 = time.monotonic()
    nodes: list[Node] = list(await asyncio.gather(*(enroll(relayed, f"n{i}") for i in range(N + SENDERS))))
    sinks, senders = nodes[:N], nodes[N:]
    sink_links = list(await asyncio.gather(*(n.connect(relayed.url, transports=(transport,)) for n in sinks)))
    send_links = list(await asyncio.gather(*(n.connect(relayed.url) for n in senders)))
    hub = relayed.relay.hub  # type: ignore[attr-defined]
    assert all(n.key in hub.clients for n in nodes)
    for lk in sink_links:
        _stop_reading(lk)  # this client never reads again
    print(f"\n{N + SENDERS} clients enrolled and connected in {time.monotonic() - t0:.1f} s")

    gc.collect()
    base = rss()
    peak = base
    payload = b"\x04" + bytes(packet_size - 1)  # a WireGuard transport message as large as allowed
    sent = 0
    nxt = 0
    start = time.monotonic()
    sample = 0.0
    hub_sinks = [hub.clients[n.key] for n in sinks]
    while (now := time.monotonic()) < start + SEND_MAX:
        if now >= start + SEND_SECONDS and all(c.drops for c in hub_sinks):
            break  # every queue is full and dropping: the relay holds all it ever will
        for s in send_links:
            impl = s._impl  # type: ignore[attr-defined]
            for _ in range(64):  # as fast as the sender's own link takes them (no point in its drops)
                if impl.paused:
                    break
                s.send_packet(sinks[nxt].key, payload)
                nxt = (nxt + 1) % N
                sent += 1
        await asyncio.sleep(0)  # let the relay read, route and queue
        if now >= sample:
            sample = now + 0.05
            peak = max(peak, rss())
    for _ in range(20):  # let what the senders buffered arrive
        await asyncio.sleep(0.05)
        peak = max(peak, rss())

    slow = hub_sinks
    elapsed = time.monotonic() - start
    held = sum(_held(c) for c in slow)
    drops = sum(c.drops for c in slow)
    growth = peak - base
    print(
        f"{N} {transport} clients that never read, {SENDERS} senders x {elapsed:.1f} s of {packet_size}-byte "
        "packets: "
        f"{sent} sent ({sent * packet_size / MIB:.0f} MiB), {drops} dropped at the relay; relay holds "
        f"{held / MIB:.1f} MiB for them ({held / N / 1024:.0f} KiB each); RSS grew {growth / MIB:.1f} MiB "
        f"(bound {bound / MIB:.1f} MiB = {N} x {per_client / MIB:.2f} MiB + {SLACK // MIB} MiB)"
    )
    assert growth < bound
    assert held <= held_bound
    assert drops > 0, "the senders did not fill the queues: the test measured nothing"

    # a packet over the cap: meshd drops it (counted) rather than have the relay close the link ...
    s = send_links[0]
    before = s.dropped
    s.send_packet(sinks[0].key, bytes(relay.MAX_PACKET + 1))
    assert s.dropped == before + 1 and s.is_open
    # ... and the relay refuses one sent anyway, at its header, by closing that connection
    frame = (
        relay.HEADER.pack(relay.FrameType.SEND_PACKET, relay.KEY_LEN + relay.MAX_PACKET + 1) + sinks[0].key
    )
    s._impl.transport.write(frame)  # type: ignore[attr-defined]
    reason = await asyncio.wait_for(s.closed, 5)
    print(f"oversized packet: relay closed the sender ({reason})")
    for lk in [*sink_links, *send_links]:
        lk.close()
