"""WebSocket fallback transport: binary messages carry relay frames (for proxies that only pass WebSocket)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from coordinator.relay import hub as relay_hub
from coordinator.relay.front import PREAUTH_TIMEOUT, WS_PREAUTH_DONE
from coordinator.relay.hub import ClientConn, RelayHub
from meshd.proto import relay

#: a relay WebSocket that has not authenticated (CLIENT_HELLO) this long after its upgrade is closed: the
#: front's pre-auth deadline ends when the HTTP head is handed over, so the WebSocket phase needs its own
HELLO_DEADLINE = PREAUTH_TIMEOUT


class WsClient(ClientConn):
    transport_name = "websocket"

    def __init__(self, hub: RelayHub, ws: WebSocket, peer: str) -> None:
        super().__init__(hub, peer)
        self.ws = ws
        #: frames the writer task has not sent yet: at most QUEUE_FRAMES and QUEUE_BYTES, like the Upgrade
        #: transport's queue (then the oldest is dropped); ``out_bytes`` is their size
        self.out: collections.deque[bytes] = collections.deque()
        self.out_bytes = 0
        self.wake = asyncio.Event()

    def _write(self, data: bytes) -> None:
        out = self.out
        out.append(data)
        self.out_bytes += len(data)
        # the writer task is behind (uvicorn's send waits while the transport is over its high-water mark)
        while len(out) > relay_hub.QUEUE_FRAMES or self.out_bytes > relay_hub.QUEUE_BYTES:
            self.out_bytes -= len(out.popleft())
            self.drops += 1
            self.hub.metrics.drops.labels(self.hub.region, "queue").inc()
        self.wake.set()

    def _write_parts(self, parts: list[bytes | memoryview]) -> None:
        # frame by frame: the writer joins queued frames into messages itself (relay.take_batch), and the
        # queue drops the oldest frame, not the oldest batch
        for i in range(0, len(parts), 2):
            self._write(b"".join((parts[i], parts[i + 1])))

    def _close_transport(self) -> None:
        self.wake.set()

    async def writer(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.out:
                batch = relay.take_batch(self.out)
                self.out_bytes -= len(batch)
                await self.ws.send_bytes(batch)
            if self.closed:
                return


async def serve_websocket(ws: WebSocket, hub: RelayHub) -> None:
    """Run one WebSocket relay client until it or we close."""
    # the front counts this connection as pre-auth (caps, and a backstop deadline) until told: see
    # coordinator.relay.front.guarded_protocol
    preauth_done = ws.scope.get("state", {}).get(WS_PREAUTH_DONE)
    told = False

    def authenticated() -> None:
        nonlocal told
        if preauth_done is not None and not told:
            told = True
            preauth_done(True)

    try:
        await _serve(ws, hub, authenticated)
    finally:
        if preauth_done is not None and not told:
            preauth_done(False)


async def _serve(ws: WebSocket, hub: RelayHub, authenticated: Callable[[], None]) -> None:
    await ws.accept()
    client = ws.client
    conn = WsClient(hub, ws, f"{client.host}:{client.port}" if client else "?")
    writer = asyncio.create_task(conn.writer())
    conn.start()  # SERVER_CHALLENGE first
    deadline = asyncio.get_running_loop().time() + HELLO_DEADLINE
    try:
        while not conn.closed:
            if conn.key is None:
                left = deadline - asyncio.get_running_loop().time()
                try:
                    async with asyncio.timeout(max(left, 0.0)):  # keeps a cancellation (wait_for may not)
                        msg = await ws.receive()
                except TimeoutError:
                    conn.close("no CLIENT_HELLO in time", tell=True)
                    break
            else:
                msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                conn.close("websocket closed")
                break
            data = msg.get("bytes")
            if data is None:
                conn.close("protocol error: text message on the relay websocket", tell=True)
                break
            conn.feed(data)
            if conn.key is not None:
                authenticated()
    except WebSocketDisconnect:
        conn.close("websocket closed")
    finally:
        conn.close("websocket closed")
        # let the writer flush what is queued (a CLOSE frame, say) for a moment; asyncio.wait never raises,
        # so neither a writer error nor the 3.11 wait_for race can hide our own cancellation
        done, _ = await asyncio.wait([writer], timeout=1.0)
        writer.cancel()
        for t in done:
            if not t.cancelled():
                t.exception()  # a send on a websocket that went away: nothing more to do about it
        with contextlib.suppress(Exception):  # closing a websocket that is gone already
            await ws.close()
