"""The relay inside the coordinator: embedded hub, ticket endpoint, standalone-relay feed, relay_home.

* ``POST /api/v1/relay/ticket`` (signed node request) -> ``{"ticket", "not_after"}``: a short-lived relay
  ticket (:mod:`meshd.proto.ticket`) for the node's current WireGuard key.
* ``/api/v1/relay/ws``: the WebSocket transport of the embedded hub (the Upgrade transport is the
  front protocol on the same port, :mod:`coordinator.relay.front`).
* ``/api/v1/relay/feed`` (WebSocket, ``Authorization: Bearer <relay secret>``; the secret is
  ``<state-dir>/relay.secret``): a standalone relay's link. We send ``keys`` (trusted signing keys) and
  ``valid`` (node ids allowed now) on connect, then ``revoke`` the moment a node is removed or expired
  (so it is dropped within a second everywhere). The relay sends ``region`` (it joins the relay map),
  ``attach`` (a node made it its home: published as ``relay_home``) and ``session`` records, which
  we write to the audit trail: standalone relays keep no audit log of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, WebSocket
from starlette.websockets import WebSocketDisconnect

from coordinator.api.deps import CoreDep, NodeDep
from coordinator.core import Core
from coordinator.errors import Forbidden
from coordinator.relay.hub import ClientConn, RelayHub, RelayMetrics, SessionRecord
from coordinator.relay.ws import WS_PATH, serve_websocket
from meshd.proto import ticket
from meshd.proto.encoding import b64encode
from meshd.proto.netmap import RelayRegion

log = logging.getLogger("coordinator.relay")

FEED_PATH = "/api/v1/relay/feed"
TICK = 0.2


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
        self._tasks: set[asyncio.Task[Any]] = set()
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
            self._ticker = asyncio.create_task(self._tick(), name="relay-tick")

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
            self._ticker = None
        if self.hub is not None:
            self.hub.close_all("coordinator shutting down")
        for ws in list(self.feeds):
            with contextlib.suppress(Exception):
                await ws.close(1012)
        for t in list(self._tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 2)

    async def _tick(self) -> None:
        assert self.hub is not None
        while True:
            await asyncio.sleep(TICK)
            self.hub.tick()

    def _spawn(self, coro: Any) -> None:
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
        msg = json.dumps({"type": "revoke", "node_id": node_id, "reason": reason})
        for ws in list(self.feeds):
            self._spawn(_send_quiet(ws, msg))

    # -- effects -------------------------------------------------------------------------------------------
    def _open(self, conn: ClientConn) -> None:
        self._spawn(self.audit_open(conn.node_id, "default", conn.transport_name))
        if conn.home:
            self._spawn(self.attach(conn.node_id, 1))

    def _session(self, rec: SessionRecord) -> None:
        self._spawn(self.audit_session(rec))

    async def audit_open(self, node_id: int, region: str, transport: str) -> None:
        name = self._name(node_id)
        with contextlib.suppress(Exception):
            async with self.core.transaction() as tx:
                await tx.audit(
                    f"node:{name}",
                    "relay.session.open",
                    f"node:{name}",
                    {"region": region, "transport": transport},
                )

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
            await ws.close(4401, "bad relay secret")
            return
        await ws.accept()
        self.feeds.add(ws)
        try:
            await ws.send_text(
                json.dumps({"type": "keys", "trusted": [b64encode(k) for k in self.core.keys.trusted]})
            )
            valid = [i for i, (_, expired) in self.core.node_keys.items() if not expired]
            await ws.send_text(json.dumps({"type": "valid", "node_ids": valid}))
            while True:
                text = await ws.receive_text()
                try:
                    await self._feed_message(json.loads(text))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("relay feed: bad message: %s", exc)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.feeds.discard(ws)

    async def _feed_message(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "region":
            await self.add_region(
                RelayRegion(int(msg["id"]), str(msg["name"]), str(msg["url"]), int(msg["stun_port"]))
            )
        elif kind == "attach":
            await self.attach(int(msg["node_id"]), int(msg["region_id"]))
        elif kind == "open":
            await self.audit_open(int(msg["node_id"]), str(msg["region"]), str(msg["transport"]))
        elif kind == "session":
            rec = msg["record"]
            await self.audit_session(SessionRecord(**{k: rec[k] for k in SessionRecord.__dataclass_fields__}))
        else:
            raise ValueError(f"unknown type {kind!r}")


async def _send_quiet(ws: WebSocket, text: str) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(text)


def router(service: RelayService) -> APIRouter:
    r = APIRouter(tags=["relay"])

    @r.post("/api/v1/relay/ticket")
    async def relay_ticket(node_id: NodeDep, core: CoreDep) -> dict[str, Any]:
        peer = core.state.peers.get(node_id)
        if peer is None:
            raise Forbidden("node removed or expired")
        text = ticket.make(node_id, peer.wg_public_key, core.keys.active_seed, time.time())
        return {"ticket": text, "not_after": ticket.decode(text)[0].not_after}

    @r.websocket(FEED_PATH)
    async def relay_feed(ws: WebSocket) -> None:
        await service.feed(ws)

    if service.hub is not None:
        hub = service.hub

        @r.websocket(WS_PATH)
        async def relay_ws(ws: WebSocket) -> None:
            await serve_websocket(ws, hub)

    return r


def state_of(request: Request) -> RelayService:
    svc: RelayService = request.app.state.relay
    return svc
