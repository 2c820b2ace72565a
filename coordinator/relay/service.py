"""The relay inside the coordinator: embedded hub, ticket endpoint, standalone-relay feed, relay_home.

* ``POST /api/v1/relay/ticket`` (signed node request) -> ``{"ticket", "not_after"}``: a short-lived relay
  ticket (:mod:`meshd.proto.ticket`) for the node's current WireGuard key.
* ``/api/v1/relay/ws``: the WebSocket transport of the embedded hub (the Upgrade transport is the
  front protocol on the same port, :mod:`coordinator.relay.front`).
* ``/api/v1/relay/feed`` (WebSocket, ``Authorization: Bearer <relay secret>``; the secret is
  ``<state-dir>/relay.secret``): a standalone relay's link (messages: :mod:`meshd.proto.relayfeed`). We
  send ``keys`` (trusted signing keys) and ``valid`` (node ids allowed now) on connect, then ``revoke``
  the moment a node is removed or expired (so it is dropped within a second everywhere). The relay sends
  ``region`` (it joins the relay map), ``attach`` (a node made it its home: published as ``relay_home``)
  and ``session`` records, which we write to the audit trail: standalone relays keep no audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Coroutine
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from coordinator.api.deps import CoreDep, NodeDep
from coordinator.core import Core
from coordinator.errors import Forbidden
from coordinator.relay.hub import ClientConn, RelayHub, RelayMetrics
from coordinator.relay.ws import serve_websocket
from meshd.proto import relay, relayfeed, ticket
from meshd.proto.netmap import CloseCode, RelayRegion
from meshd.proto.relayfeed import SessionRecord
from meshd.supervise import supervise

log = logging.getLogger("coordinator.relay")

TICK = 0.2
#: Audit writes, relay_home updates and feed sends in flight. Relay clients cause them (one per session
#: open and close), so under a connection storm with a slow database they are dropped (and logged)
#: beyond this many rather than piling up without bound. Revocations are never dropped (see _spawn).
MAX_PENDING = 1000


def load_or_create_secret(state_dir: Path) -> str:
    """The shared secret standalone relays present on the feed (created 0600 on first use)."""
    path = state_dir / "relay.secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


class RelayService:
    """Everything relay-related the coordinator process owns."""

    def __init__(self, core: Core, *, embedded: bool = True) -> None:
        self.core = core
        self.secret = load_or_create_secret(core.settings.state_dir)
        self.metrics = RelayMetrics(core.metrics.registry)
        self.hub: RelayHub | None = None
        if embedded:
            self.hub = RelayHub(
                "default",
                1,
                self.verify,
                self.metrics,
                on_session=self._session,
                on_open=self._open,
                on_home=lambda c: self._spawn(self.attach(c.node_id, 1)),
            )
        self.feeds: set[WebSocket] = set()
        self._tasks: set[asyncio.Task[Any]] = set()  #: at most MAX_PENDING
        self.skipped = 0  #: effects dropped because MAX_PENDING were in flight
        self._ticker: asyncio.Task[None] | None = None
        core.revoke_hooks.append(self.revoke)

    @classmethod
    def for_core(cls, core: Core, *, embedded: bool = True) -> RelayService:
        """One service per core (several apps may be built around one core, e.g. in tests)."""
        svc = getattr(core, "relay_service", None)
        if not isinstance(svc, cls):
            svc = cls(core, embedded=embedded)
            core.relay_service = svc  # type: ignore[attr-defined]
        return svc

    # -- life cycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._ticker is not None and not self._ticker.done():
            return
        if self.hub is not None:
            # supervised: a failing tick must not silently stop ticket expiry for good
            self._ticker = asyncio.create_task(supervise("relay-tick", self._tick), name="relay-tick")

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
            self._ticker = None
        if self.hub is not None:
            self.hub.close_all("coordinator shutting down")
        for ws in list(self.feeds):
            with contextlib.suppress(Exception):  # the feed may be gone already
                await ws.close(CloseCode.RESTART)
        if self._tasks:  # let audit writes in flight finish (asyncio.wait never raises their errors)
            await asyncio.wait(list(self._tasks), timeout=2)

    async def _tick(self) -> None:
        assert self.hub is not None
        while True:
            await asyncio.sleep(TICK)
            self.hub.tick()

    def _spawn(self, coro: Coroutine[Any, Any, None], *, must: bool = False) -> None:
        """Run an effect in the background; beyond MAX_PENDING in flight it is dropped, unless ``must``
        (revocations: few, caused by admins, and a dropped one would leave a removed node relayed)."""
        if len(self._tasks) >= MAX_PENDING and not must:
            coro.close()
            self.skipped += 1
            if self.skipped % 100 == 1:
                log.warning("relay: %d effect(s) dropped: %d in flight", self.skipped, MAX_PENDING)
            return
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- checks --------------------------------------------------------------------------------------------
    def verify(self, data: bytes, now: float) -> ticket.TicketPayload:
        payload = ticket.verify(data, self.core.keys.trusted, now)
        entry = self.core.node_keys.get(payload.node_id)
        if entry is None or entry[1]:
            raise ticket.TicketError(f"node {payload.node_id} was removed or expired")
        return payload

    def revoke(self, node_id: int, reason: str) -> None:
        """Core hook: a node was removed/expired. Drop it here and tell every standalone relay."""
        if self.hub is not None:
            n = self.hub.revoke_node(node_id, reason)
            if n:
                log.info("relay: dropped %d session(s) of node %d: %s", n, node_id, reason)
        msg = relayfeed.encode(relayfeed.Revoke(node_id, reason[: relayfeed.MAX_TEXT]))
        for ws in list(self.feeds):
            self._spawn(_send_quiet(ws, msg), must=True)

    # -- effects -------------------------------------------------------------------------------------------
    def _open(self, conn: ClientConn) -> None:
        self._spawn(self.audit_open(conn.node_id, "default", conn.transport_name))
        if conn.home:
            self._spawn(self.attach(conn.node_id, 1))

    def _session(self, rec: SessionRecord) -> None:
        self._spawn(self.audit_session(rec))

    async def audit_open(self, node_id: int, region: str, transport: str) -> None:
        name = self._name(node_id)
        try:
            async with self.core.transaction() as tx:
                await tx.audit(
                    f"node:{name}",
                    "relay.session.open",
                    f"node:{name}",
                    {"region": region, "transport": transport},
                )
        except Exception as exc:  # never let audit trouble break the relay
            log.warning("relay: audit of a session opening failed: %s", exc)

    async def audit_session(self, rec: SessionRecord) -> None:
        name = self._name(rec.node_id)
        details = asdict(rec)
        details.pop("key", None)
        try:
            async with self.core.transaction() as tx:
                await tx.audit(f"node:{name}", "relay.session.close", f"node:{name}", details)
        except Exception as exc:  # never let audit trouble break the relay
            log.warning("relay: audit of a session failed: %s", exc)

    def _name(self, node_id: int) -> str:
        peer = self.core.state.peers.get(node_id)
        return peer.name if peer else str(node_id)

    async def attach(self, node_id: int, region_id: int) -> None:
        """A node made `region_id` its home: publish it as the node's ``relay_home``."""
        peer = self.core.state.peers.get(node_id)
        if peer is None or peer.relay_home == region_id:
            return
        state = self.core.state
        try:
            async with self.core.transaction() as tx:
                tx.change("changed", node_id)

                def commit() -> None:
                    current = state.peers.get(node_id)
                    if current is not None:
                        state.put_peer(replace(current, relay_home=region_id))

                tx.on_commit(commit)
        except Exception as exc:
            log.warning("relay: publishing relay_home of node %d failed: %s", node_id, exc)

    async def add_region(self, region: RelayRegion) -> None:
        """A standalone relay announced itself: it joins (or updates) the relay map."""
        state = self.core.state
        current = {r.id: r for r in state.relays}
        if current.get(region.id) == region:
            return
        current[region.id] = region
        new = tuple(sorted(current.values(), key=lambda r: r.id))
        async with self.core.transaction() as tx:
            tx.change("relays")

            def commit() -> None:
                state.relays = new

            tx.on_commit(commit)
        log.info("relay region %d %r at %s joined the relay map", region.id, region.name, region.url)

    # -- the feed ------------------------------------------------------------------------------------------
    async def feed(self, ws: WebSocket) -> None:
        auth = ws.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.secret}".encode()):
            await ws.close(CloseCode.UNAUTHORIZED, "bad relay secret")
            return
        await ws.accept()
        self.feeds.add(ws)
        try:
            await ws.send_text(relayfeed.encode(relayfeed.Keys(tuple(self.core.keys.trusted))))
            valid = frozenset(i for i, (_, expired) in self.core.node_keys.items() if not expired)
            await ws.send_text(relayfeed.encode(relayfeed.Valid(valid)))
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                try:
                    msg = relayfeed.decode_to_coordinator(message.get("text") or message.get("bytes") or b"")
                except relayfeed.FeedError as exc:
                    log.warning("relay feed: bad message: %s", exc)
                    continue
                await self._feed_message(msg)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.feeds.discard(ws)

    async def _feed_message(self, msg: relayfeed.ToCoordinator) -> None:
        if isinstance(msg, relayfeed.Region):
            await self.add_region(msg.region)
        elif isinstance(msg, relayfeed.Attach):
            await self.attach(msg.node_id, msg.region_id)
        elif isinstance(msg, relayfeed.SessionOpen):
            await self.audit_open(msg.node_id, msg.region, msg.transport)
        else:
            await self.audit_session(msg)


async def _send_quiet(ws: WebSocket, text: str) -> None:
    with contextlib.suppress(Exception):  # a feed that went away; its relay reconnects and resyncs
        await ws.send_text(text)


def router(service: RelayService) -> APIRouter:
    r = APIRouter(tags=["relay"])

    @r.post(relay.TICKET_PATH)
    async def relay_ticket(node_id: NodeDep, core: CoreDep) -> dict[str, Any]:
        peer = core.state.peers.get(node_id)
        if peer is None:
            raise Forbidden("node removed or expired")
        text = ticket.make(node_id, peer.wg_public_key, core.keys.active_seed, time.time())
        return {"ticket": text, "not_after": ticket.decode(text)[0].not_after}

    @r.websocket(relayfeed.FEED_PATH)
    async def relay_feed(ws: WebSocket) -> None:
        await service.feed(ws)

    if service.hub is not None:
        hub = service.hub

        @r.websocket(relay.WS_PATH)
        async def relay_ws(ws: WebSocket) -> None:
            await serve_websocket(ws, hub)

    return r
