"""``coordinator relay serve``: a standalone relay region (DESIGN.md §2).

The same hub and transports as the embedded relay (Upgrade on the listening port, WebSocket fallback),
plus ``/healthz``, ``/metrics`` and STUN on ``--stun-port`` (and the port after it). It holds the feed
WebSocket to the coordinator (:mod:`coordinator.relay.service`), authenticated with the relay secret:
the feed gives the trusted signing keys and pushes revocations (a removed node is dropped at once), and
this relay sends its region (it joins the relay map), ``attach`` (relay_home) and session records, which
the coordinator writes to ITS audit trail (no local audit log; records made while the feed is down are
kept in a bounded queue and sent on reconnect).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import signal
import socket
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest

from coordinator.relay.front import install
from coordinator.relay.hub import ClientConn, RelayHub, RelayMetrics, SessionRecord
from coordinator.relay.service import FEED_PATH, TICK
from coordinator.relay.ws import WS_PATH, serve_websocket
from coordinator.stun import start_stun
from meshd.proto import ticket
from meshd.proto.encoding import b64decode

log = logging.getLogger("coordinator.relay")


@dataclass(frozen=True, slots=True)
class RelayOptions:
    listen: tuple[str, int]
    coordinator: str
    secret: str
    region_id: int = 2
    name: str = "region2"
    public_url: str | None = None
    stun_port: int = 0
    pong_delay: float = 0.0  #: TEST ONLY (see RelayHub.pong_delay)


class Standalone:
    def __init__(self, opts: RelayOptions) -> None:
        self.opts = opts
        self.trusted: tuple[bytes, ...] = ()
        self.revoked: set[int] = set()
        self.registry = CollectorRegistry()
        self.hub = RelayHub(
            opts.name,
            opts.region_id,
            self.verify,
            RelayMetrics(self.registry),
            on_session=lambda r: self._report({"type": "session", "record": asdict(r)}),
            on_open=self._opened,
            on_home=lambda c: self._report(
                {"type": "attach", "node_id": c.node_id, "region_id": opts.region_id}
            ),
            pong_delay=opts.pong_delay,
        )
        self.outbox: collections.deque[str] = collections.deque(maxlen=10_000)
        self.wake = asyncio.Event()
        self.feed_up = asyncio.Event()

    @property
    def url(self) -> str:
        host, port = self.opts.listen
        return (self.opts.public_url or f"http://{host}:{port}").rstrip("/")

    def verify(self, data: bytes, now: float) -> ticket.TicketPayload:
        if not self.trusted:
            raise ticket.TicketError("relay not yet linked to its coordinator: try again shortly")
        payload = ticket.verify(data, self.trusted, now)
        if payload.node_id in self.revoked:
            raise ticket.TicketError(f"node {payload.node_id} was removed or expired")
        return payload

    def _opened(self, c: ClientConn) -> None:
        self._report(
            {"type": "open", "node_id": c.node_id, "region": self.opts.name, "transport": c.transport_name}
        )
        if c.home:
            self._report({"type": "attach", "node_id": c.node_id, "region_id": self.opts.region_id})

    def _report(self, msg: dict[str, Any]) -> None:
        self.outbox.append(json.dumps(msg))
        self.wake.set()

    def app(self) -> FastAPI:
        app = FastAPI(title="relay", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/healthz")
        async def healthz() -> dict[str, Any]:
            return {"ok": True, "region": self.opts.name, "coordinator_linked": self.feed_up.is_set()}

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            self.hub.flush_counts()
            return PlainTextResponse(generate_latest(self.registry).decode())

        @app.websocket(WS_PATH)
        async def relay_ws(ws: WebSocket) -> None:
            await serve_websocket(ws, self.hub)

        return app

    async def feed_loop(self) -> None:
        from websockets.asyncio.client import connect

        base = self.opts.coordinator.rstrip("/")
        url = "ws" + base[len("http") :] + FEED_PATH
        delay = 0.2
        region = {
            "type": "region",
            "id": self.opts.region_id,
            "name": self.opts.name,
            "url": self.url,
            "stun_port": self.opts.stun_port,
        }
        while True:
            try:
                async with connect(
                    url, additional_headers={"Authorization": f"Bearer {self.opts.secret}"}, open_timeout=5
                ) as ws:
                    await ws.send(json.dumps(region))
                    delay = 0.2
                    sender = asyncio.create_task(self._send_outbox(ws))
                    try:
                        async for text in ws:
                            self._feed_message(json.loads(text))
                    finally:
                        sender.cancel()
                        self.feed_up.clear()
            except Exception as exc:  # coordinator down, bad secret, restart
                log.warning("feed to %s: %s; retrying in %.1f s", base, exc, delay)
            self.feed_up.clear()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(5.0, delay * 2)

    async def _send_outbox(self, ws: Any) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.outbox:
                await ws.send(self.outbox[0])
                self.outbox.popleft()

    def _feed_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "keys":
            self.trusted = tuple(b64decode(k, length=32) for k in msg["trusted"])
            self.feed_up.set()
            log.info("linked to the coordinator: %d trusted key(s)", len(self.trusted))
        elif kind == "valid":
            valid = set(msg["node_ids"])
            for c in list(self.hub.clients.values()):
                if c.node_id not in valid:
                    c.close("node removed or expired", tell=True)
        elif kind == "revoke":
            node_id = int(msg["node_id"])
            self.revoked.add(node_id)
            n = self.hub.revoke_node(node_id, str(msg.get("reason", "node removed")))
            log.info("revoked node %d (%d session(s) dropped)", node_id, n)

    async def tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.hub.tick()


def _session_record(msg: dict[str, Any]) -> SessionRecord:  # pragma: no cover - kept for symmetry
    return SessionRecord(**msg)


async def serve(opts: RelayOptions) -> None:
    relay = Standalone(opts)
    host, port = opts.listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    stun: list[asyncio.DatagramTransport] = []
    if opts.stun_port:
        stun = await start_stun(host, opts.stun_port)
    config = uvicorn.Config(relay.app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    install(config, relay.hub)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [
        asyncio.create_task(server.serve(sockets=[sock])),
        asyncio.create_task(relay.feed_loop()),
        asyncio.create_task(relay.tick_loop()),
    ]
    print(f"relay region {opts.name} (id {opts.region_id}) listening on {host}:{port}", flush=True)
    try:
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
    finally:
        relay.hub.close_all("relay shutting down")
        server.should_exit = True
        for t in tasks[1:]:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tasks[0], 3)
        for st in stun:
            st.close()
        sock.close()
