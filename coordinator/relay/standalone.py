"""``coordinator relay serve``: a standalone relay region (DESIGN.md §2).

The same hub and transports as the embedded relay (Upgrade on the listening port, WebSocket fallback),
plus ``/healthz``, ``/metrics`` and STUN on ``--stun-port`` (and the port after it). It holds the feed
WebSocket to the coordinator (:mod:`coordinator.relay.service`), authenticated with the relay secret:
the feed (:mod:`meshd.proto.relayfeed`) gives the trusted signing keys and pushes revocations (a removed
node is dropped at once), and this relay sends its region (it joins the relay map), ``attach``
(relay_home) and session records, which the coordinator writes to ITS audit trail (no local audit log;
records made while the feed is down are kept in a bounded queue and sent on reconnect).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import signal
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest

from coordinator.relay import udp as relay_udp
from coordinator.relay.front import install
from coordinator.relay.hub import ClientConn, RelayHub, RelayMetrics
from coordinator.relay.service import TICK
from coordinator.relay.ws import serve_websocket
from coordinator.stun import start_stun
from meshd.proto import relay, relayfeed, ticket
from meshd.proto.netmap import RelayRegion
from meshd.supervise import supervise

log = logging.getLogger("coordinator.relay")

#: Reports (session records, attach, open) kept while the feed is down; beyond that the oldest are
#: dropped (and counted): a coordinator outage must not grow the relay's memory without bound.
OUTBOX_MAX = 10_000


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
    udp_ports: range | None = None  #: UDP relay ports (issue 14); None: TCP relay only


class Standalone:
    def __init__(self, opts: RelayOptions) -> None:
        self.opts = opts
        self.trusted: tuple[bytes, ...] = ()
        self.revoked: set[int] = set()
        #: node id -> its current WireGuard key, from the feed (``valid``, ``rekeyed``): tickets for any
        #: other key are refused. A node enrolled after ``valid`` is absent until it rotates; its tickets
        #: name its only key so far. Bounded by the coordinator's node count, like ``revoked``.
        self.current: dict[int, bytes] = {}
        self.registry = CollectorRegistry()
        self.hub = RelayHub(
            opts.name,
            opts.region_id,
            self.verify,
            RelayMetrics(self.registry),
            on_session=self._report,
            on_open=self._opened,
            on_home=lambda c: self._report(relayfeed.Attach(c.node_id, opts.region_id)),
            pong_delay=opts.pong_delay,
        )
        self.outbox: collections.deque[str] = collections.deque(maxlen=OUTBOX_MAX)
        self.outbox_dropped = 0
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
        current = self.current.get(payload.node_id)
        if current is not None and current != payload.key:
            raise ticket.TicketError(f"the ticket is for a WireGuard key node {payload.node_id} rotated away")
        return payload

    def _opened(self, c: ClientConn) -> None:
        self._report(relayfeed.SessionOpen(c.node_id, self.opts.name, c.transport_name))
        if c.home:
            self._report(relayfeed.Attach(c.node_id, self.opts.region_id))

    def _report(self, msg: relayfeed.ToCoordinator) -> None:
        if len(self.outbox) == OUTBOX_MAX:
            self.outbox_dropped += 1  # the deque drops the oldest on append
        self.outbox.append(relayfeed.encode(msg))
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

        @app.websocket(relay.WS_PATH)
        async def relay_ws(ws: WebSocket) -> None:
            await serve_websocket(ws, self.hub)

        return app

    async def feed_loop(self) -> None:
        from websockets.asyncio.client import connect

        base = self.opts.coordinator.rstrip("/")
        url = relay.websocket_url(base, relayfeed.FEED_PATH)
        delay = 0.2
        o = self.opts
        region = relayfeed.encode(relayfeed.Region(RelayRegion(o.region_id, o.name, self.url, o.stun_port)))
        while True:
            try:
                async with connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {self.opts.secret}"},
                    open_timeout=5,
                    max_size=relayfeed.MAX_MESSAGE_BYTES,  # a ``valid`` list of a big mesh exceeds 1 MiB
                ) as ws:
                    await ws.send(region)
                    delay = 0.2
                    sender = asyncio.create_task(self._send_outbox(ws))
                    try:
                        async for data in ws:
                            try:
                                msg = relayfeed.decode_to_relay(data)
                            except relayfeed.FeedError as exc:
                                log.warning("feed: bad message from the coordinator: %s", exc)
                                continue
                            self._feed_message(msg)
                    finally:
                        sender.cancel()
                        self.feed_up.clear()
            except Exception as exc:  # coordinator down, bad secret, restart (CancelledError propagates)
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

    def _feed_message(self, msg: relayfeed.ToRelay) -> None:
        if isinstance(msg, relayfeed.Keys):
            self.trusted = msg.trusted
            self.feed_up.set()
            log.info("linked to the coordinator: %d trusted key(s)", len(self.trusted))
        elif isinstance(msg, relayfeed.Valid):
            self.current = dict(msg.nodes)
            for c in list(self.hub.clients.values()):
                if c.node_id not in msg.nodes:
                    c.close("node removed or expired", tell=True)
                elif msg.nodes[c.node_id] != c.key:
                    c.close("wireguard key rotated", tell=True)
        elif isinstance(msg, relayfeed.Rekeyed):
            self.current[msg.node_id] = msg.key
            n = self.hub.revoke_node(msg.node_id, "wireguard key rotated", keep_key=msg.key)
            log.info("node %d rotated its WireGuard key (%d session(s) dropped)", msg.node_id, n)
        else:
            # bounded by the coordinator's node ids: each is revoked once, like its database row
            self.revoked.add(msg.node_id)
            n = self.hub.revoke_node(msg.node_id, msg.reason)
            log.info("revoked node %d (%d session(s) dropped)", msg.node_id, n)

    async def tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.hub.tick()


async def serve(opts: RelayOptions) -> None:
    region = Standalone(opts)
    host, port = opts.listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    stun: list[asyncio.DatagramTransport] = []
    if opts.stun_port:
        stun = await start_stun(host, opts.stun_port)
    if opts.udp_ports is not None:  # every pair asks from both sides: that is the policy's consent here
        relay_udp.start(region.hub, host, opts.udp_ports, kernel=relay_udp.kernel_forwarder(opts.region_id))
    config = uvicorn.Config(region.app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    install(config, region.hub)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [
        asyncio.create_task(server.serve(sockets=[sock])),
        # supervised: neither loop may die silently and leave the relay unlinked or its tickets unexpired
        asyncio.create_task(supervise("relay-feed", region.feed_loop)),
        asyncio.create_task(supervise("relay-tick", region.tick_loop)),
    ]
    print(f"relay region {opts.name} (id {opts.region_id}) listening on {host}:{port}", flush=True)
    try:
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
    finally:
        region.hub.close_all("relay shutting down")
        server.should_exit = True
        for t in tasks[1:]:
            t.cancel()
        with contextlib.suppress(Exception):  # uvicorn's own shutdown trouble: we exit anyway
            async with asyncio.timeout(3):
                await tasks[0]
        for st in stun:
            st.close()
        sock.close()
