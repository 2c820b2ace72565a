"""The relay inside the coordinator: embedded hub, ticket endpoint, standalone-relay feed, relay_home.

* ``POST /api/v1/relay/ticket`` (signed node request, ``{"region_id": N}``) -> ``{"ticket", "not_after"}``:
  a short-lived relay ticket (:mod:`meshd.proto.ticket`) for region N, the node's Ed25519 key and its
  current WireGuard key. A rotated WireGuard key's tickets stop working at once: the embedded relay checks
  the node's current key on every hello and drops sessions of a rotated-away key within a tick (0.2 s);
  standalone relays get the current keys over the feed (``valid`` on connect, ``rekeyed`` on rotation).
* ``/api/v1/relay/ws``: the WebSocket transport of the embedded hub (the Upgrade transport is the
  front protocol on the same port, :mod:`coordinator.relay.front`).
* ``/api/v1/relay/feed`` (WebSocket, ``Authorization: Bearer <relay secret>``; the secret is
  ``<state-dir>/relay.secret``): a standalone relay's link (messages: :mod:`meshd.proto.relayfeed`). We
  send ``keys`` (trusted signing keys) and ``valid`` (node ids allowed now, with their WireGuard keys) on
  connect, then ``revoke`` the moment a node is removed or expired (so it is dropped within a second
  everywhere) and ``rekeyed`` when a node's WireGuard key rotates. The relay sends ``region`` first (it
  joins the relay map; the connection is then bound to that region id, which may not be 1 nor one another
  live feed holds), then ``attach`` (a node made it its home: published as ``relay_home``) and
  ``session`` records for that region only, which we write to the audit trail: standalone relays keep no
  audit log. A message for another region closes the feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Coroutine
from dataclasses import asdict, replace
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel
from sqlalchemy import update
from starlette.websockets import WebSocketDisconnect

from coordinator.api.deps import CoreDep, NodeDep
from coordinator.coalesce import Coalescer, HeldWrites
from coordinator.core import Core
from coordinator.db.models import Node
from coordinator.errors import BadRequest, Forbidden, NotFound
from coordinator.relay import secret as relay_secret
from coordinator.relay.hub import ClientConn, RelayHub, RelayMetrics
from coordinator.relay.usage import FeedUsage
from coordinator.relay.ws import serve_websocket
from meshd.proto import relay, relayfeed, ticket
from meshd.proto.encoding import b64decode
from meshd.proto.netmap import CloseCode, RelayRegion
from meshd.proto.relayfeed import SessionRecord
from meshd.supervise import supervise

log = logging.getLogger("coordinator.relay")

TICK = 0.2
#: Audit writes, relay_home updates and feed sends in flight. Relay clients cause them (one per session
#: open and close), so under a connection storm with a slow database they are dropped (and logged)
#: beyond this many rather than piling up without bound. Revocations are never dropped (see _spawn).
MAX_PENDING = 1000


class FeedRefused(Exception):
    """A standalone relay's feed spoke for a region it does not hold; the connection is closed."""


#: Relay session audit rows per node and kind (open/close): at most one per RELAY_AUDIT_INTERVAL seconds. A
#: reconnect loop would otherwise write two permanent rows per reconnect; the rows held back are counted
#: and the next row written says how many ("suppressed").
RELAY_AUDIT_INTERVAL = 60.0
#: relay_home changes per node: a burst of HOME_BURST, then one per HOME_INTERVAL seconds (the same shape
#: as endpoint writes): each change is a database write and a delta to every peer that sees the node.
HOME_BURST = 3.0
HOME_INTERVAL = 1.0


class TicketRequest(BaseModel):
    region_id: int


class RelayService:
    """Everything relay-related the coordinator process owns."""

    def __init__(self, core: Core, *, embedded: bool = True) -> None:
        self.core = core
        self.secret = relay_secret.load_or_create(core.settings.state_dir)
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
                on_home=lambda c: self._spawn(self.attach(c.node_id, self._region_id())),
            )
            self._take_region()
        self.feeds: set[WebSocket] = set()
        #: region id -> the live feed connection that announced it (one feed per region)
        self.feed_regions: dict[int, WebSocket] = {}
        #: what the standalone regions reported of their sessions (the dashboard's relays page)
        self.feed_usage = FeedUsage()
        #: node id -> WireGuard key as last seen, and the map version it was read at (rotation watch)
        self._wg_keys: dict[int, bytes] | None = None
        self._seen_version = 0
        self.watch_keys()  # the first snapshot now: a rotation before the first tick is then seen too
        self._tasks: set[asyncio.Task[Any]] = set()  #: at most MAX_PENDING
        self.skipped = 0  #: effects dropped because MAX_PENDING were in flight
        self._ticker: asyncio.Task[None] | None = None
        core.revoke_hooks.append(self.revoke)
        #: relay_home changes, coalesced per node like endpoints (coordinator/coalesce.py)
        self._homes: Coalescer[int, int] = Coalescer(
            HeldWrites(HOME_INTERVAL, HOME_BURST),
            self._publish_home,
            clock=time.monotonic,
            tasks=core.held_writes,
        )
        #: (node id, "open" | "close") -> (monotonic time of its last audit row, rows held back since)
        self._audited: dict[tuple[int, str], tuple[float, int]] = {}

    @classmethod
    def for_core(cls, core: Core, *, embedded: bool = True) -> RelayService:
        """One service per core (several apps may be built around one core, e.g. in tests)."""
        svc = getattr(core, "relay_service", None)
        if not isinstance(svc, cls):
            svc = cls(core, embedded=embedded)
            core.relay_service = svc  # type: ignore[attr-defined]
        return svc

    # -- life cycle ----------------------------------------------------------------------------------------
    def _take_region(self) -> None:
        """The embedded hub serves the core's relay region: a region per replica on PostgreSQL, chosen
        when the core starts (coordinator/replicarelays.py)."""
        region = self.core.relay_region
        if self.hub is not None and region is not None:
            self.hub.region, self.hub.region_id = region.name, region.id

    def _region_id(self) -> int:
        return self.hub.region_id if self.hub is not None else 1

    def _reserved(self) -> set[int]:
        """Region ids no standalone relay may announce: 1 and every replica's embedded relay's."""
        mine = self.core.relay_region
        return {1, *self.core.replica_regions, *((mine.id,) if mine is not None else ())}

    def start(self) -> None:
        self._take_region()
        if self._ticker is not None and not self._ticker.done():
            return
        # supervised: a failing tick must not silently stop ticket expiry or the rotation watch for good
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
        while True:
            await asyncio.sleep(TICK)
            self.watch_keys()
            if self.hub is not None:
                self.hub.tick()

    def watch_keys(self) -> None:
        """Find WireGuard key rotations in the map's change log since the last call: sessions under the
        old key are dropped here and every standalone relay is told (``rekeyed``). Reads only the changed
        nodes' entries (the whole map only at the first call or when the log was trimmed meanwhile)."""
        state = self.core.state
        if self._wg_keys is not None and state.version == self._seen_version:
            return
        changed: set[int] | None = None  # None: compare every node
        if self._wg_keys is not None:
            found: set[int] = set()
            reached = False
            for ch in reversed(state.log):
                if ch.version <= self._seen_version:
                    reached = True
                    break
                if ch.node_id is not None and ch.kind in ("added", "changed"):
                    found.add(ch.node_id)
            # unless the log was trimmed past what we saw meanwhile
            if reached or (state.log and state.log[0].version <= self._seen_version + 1):
                changed = found
        self._seen_version = state.version
        known = self._wg_keys if self._wg_keys is not None else {}
        self._wg_keys = known
        for node_id in list(state.peers) if changed is None else changed:
            peer = state.peers.get(node_id)
            if peer is None:
                continue
            key = b64decode(peer.wg_public_key, length=32)
            old = known.get(node_id)
            known[node_id] = key
            # a node added and rotated within one tick has no old key here: tell the relays anyway (a
            # rekeyed with the key a relay already has is harmless), except on a full scan
            if old != key and (changed is not None or old is not None):
                self.rekeyed(node_id, key)

    def rekeyed(self, node_id: int, key: bytes) -> None:
        """A node's WireGuard key rotated: drop its sessions under other keys here and on every region."""
        if self.hub is not None:
            n = self.hub.revoke_node(node_id, "wireguard key rotated", keep_key=key)
            if n:
                log.info("relay: dropped %d session(s) of node %d: wireguard key rotated", n, node_id)
        msg = relayfeed.encode(relayfeed.Rekeyed(node_id, key))
        for ws in list(self.feeds):
            self._spawn(_send_quiet(ws, msg), must=True)

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
        peer = self.core.state.peers.get(payload.node_id)
        if entry is None or entry[1] or peer is None:
            raise ticket.TicketError(f"node {payload.node_id} was removed or expired")
        if peer.wg_public_key != payload.wg_public_key:
            raise ticket.TicketError(f"the ticket is for a WireGuard key node {payload.node_id} rotated away")
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
        region = self.hub.region if self.hub is not None else "default"
        self._spawn(self.audit_open(conn.node_id, region, conn.transport_name))
        if conn.home:
            self._spawn(self.attach(conn.node_id, self._region_id()))

    def _session(self, rec: SessionRecord) -> None:
        self._spawn(self.audit_session(rec))

    def _audit_due(self, node_id: int, kind: str) -> int | None:
        """None: skip this row (one was written for the node within RELAY_AUDIT_INTERVAL); else the
        number of rows held back since the last one."""
        now = time.monotonic()
        last, held = self._audited.get((node_id, kind), (float("-inf"), 0))
        if now - last < RELAY_AUDIT_INTERVAL:
            self._audited[(node_id, kind)] = (last, held + 1)
            return None
        if len(self._audited) > 100_000:  # bounded: forget windows that passed (their count is lost)
            for k in [k for k, (t, _) in self._audited.items() if now - t >= RELAY_AUDIT_INTERVAL]:
                del self._audited[k]
        self._audited[(node_id, kind)] = (now, 0)
        return held

    async def audit_open(self, node_id: int, region: str, transport: str) -> None:
        suppressed = self._audit_due(node_id, "open")
        if suppressed is None:
            return
        name = self._name(node_id)
        try:
            async with self.core.transaction() as tx:
                await tx.audit(
                    f"node:{name}",
                    "relay.session.open",
                    f"node:{name}",
                    {"region": region, "transport": transport, "suppressed": suppressed},
                )
        except Exception as exc:  # never let audit trouble break the relay
            log.warning("relay: audit of a session opening failed: %s", exc)

    async def audit_session(self, rec: SessionRecord) -> None:
        suppressed = self._audit_due(rec.node_id, "close")
        if suppressed is None:
            return
        name = self._name(rec.node_id)
        details = asdict(rec)
        details.pop("key", None)
        details["suppressed"] = suppressed
        try:
            async with self.core.transaction() as tx:
                await tx.audit(f"node:{name}", "relay.session.close", f"node:{name}", details)
        except Exception as exc:  # never let audit trouble break the relay
            log.warning("relay: audit of a session failed: %s", exc)

    def _name(self, node_id: int) -> str:
        peer = self.core.state.peers.get(node_id)
        return peer.name if peer else str(node_id)

    async def attach(self, node_id: int, region_id: int) -> None:
        """A node made `region_id` its home: publish it as the node's ``relay_home``.

        Coalesced like endpoints (coordinator/nodes.py): a node whose home flaps between regions writes
        (and fans out to every peer) a burst of HOME_BURST changes, then at most one per
        HOME_INTERVAL; a change inside the window is held and the last one wins."""
        await self._homes.submit(node_id, region_id)

    async def _publish_home(self, node_id: int, region_id: int) -> None:
        peer = self.core.state.peers.get(node_id)
        if peer is None or peer.relay_home == region_id:
            return
        state = self.core.state
        try:
            async with self.core.transaction() as tx:
                tx.change("changed", node_id)
                # in the database: every replica (and this one after a restart) publishes the same home
                await tx.session.execute(update(Node).where(Node.id == node_id).values(relay_home=region_id))

                def commit() -> None:
                    current = state.peers.get(node_id)
                    if current is not None:
                        state.put_peer(replace(current, relay_home=region_id))

                tx.on_commit(commit)
        except Exception as exc:
            log.warning("relay: publishing relay_home of node %d failed: %s", node_id, exc)

    async def add_region(self, region: RelayRegion) -> None:
        """A standalone relay announced itself: it joins (or updates) the relay map. Region 1 is the
        embedded relay's and never comes from a feed (the feed checks that too)."""
        problem = relay.region_problem(region.id, region.name, region.url, region.stun_port)
        if problem is not None or region.id in self._reserved():
            raise FeedRefused(
                f"region {region.id}: {problem or 'the embedded relay of a coordinator replica holds it'}"
            )
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
        bound: list[RelayRegion] = []  #: the region this connection announced first (at most one)
        try:
            await ws.send_text(relayfeed.encode(relayfeed.Keys(tuple(self.core.keys.trusted))))
            nodes = {
                i: b64decode(p.wg_public_key, length=32)
                for i, p in self.core.state.peers.items()
                if i in self.core.node_keys and not self.core.node_keys[i][1]
            }
            await ws.send_text(relayfeed.encode(relayfeed.Valid(nodes)))
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                try:
                    msg = relayfeed.decode_to_coordinator(message.get("text") or message.get("bytes") or b"")
                except relayfeed.FeedError as exc:
                    log.warning("relay feed: bad message: %s", exc)
                    continue
                try:
                    self._bind(ws, bound, msg)
                    await self._feed_message(msg)
                except FeedRefused as exc:
                    log.warning("relay feed refused: %s", exc)
                    with contextlib.suppress(Exception):  # the feed may be gone already
                        await ws.close(CloseCode.POLICY, str(exc)[:120])
                    return
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.feeds.discard(ws)
            if bound and self.feed_regions.get(bound[0].id) is ws:
                del self.feed_regions[bound[0].id]

    def _bind(self, ws: WebSocket, bound: list[RelayRegion], msg: relayfeed.ToCoordinator) -> None:
        """A feed speaks for the one region its first message announced: never region 1 (the embedded
        relay), never a region another live feed holds, and nothing later for any other region. Every
        relay holds the same secret, so this is what keeps one relay from taking over another's entry
        in every node's relay map (or id 1's), or writing relay_home and audit records for it."""
        if not bound:
            if not isinstance(msg, relayfeed.Region):
                raise FeedRefused(f"the first message must be the region, not {type(msg).__name__}")
            rid = msg.region.id
            if rid in self._reserved():
                raise FeedRefused(f"region {rid} is a coordinator replica's embedded relay")
            holder = self.feed_regions.get(rid)
            if holder is not None and holder is not ws:
                raise FeedRefused(f"region {rid} is held by another connected relay")
            self.feed_regions[rid] = ws
            bound.append(msg.region)
            return
        region = bound[0]
        if isinstance(msg, relayfeed.Region):
            if msg.region.id != region.id:
                raise FeedRefused(f"a feed bound to region {region.id} announced region {msg.region.id}")
            bound[0] = msg.region
        elif isinstance(msg, relayfeed.Attach):
            if msg.region_id != region.id:
                raise FeedRefused(f"a feed bound to region {region.id} attached a node to {msg.region_id}")
        elif msg.region != region.name:
            raise FeedRefused(f"a feed bound to region {region.name!r} reported a session of {msg.region!r}")

    async def _feed_message(self, msg: relayfeed.ToCoordinator) -> None:
        if isinstance(msg, relayfeed.Region):
            await self.add_region(msg.region)
        elif isinstance(msg, relayfeed.Attach):
            await self.attach(msg.node_id, msg.region_id)
        elif isinstance(msg, relayfeed.SessionOpen):
            self.feed_usage.note(msg)
            await self.audit_open(msg.node_id, msg.region, msg.transport)
        else:
            self.feed_usage.note(msg)
            await self.audit_session(msg)


async def _send_quiet(ws: WebSocket, text: str) -> None:
    with contextlib.suppress(Exception):  # a feed that went away; its relay reconnects and resyncs
        await ws.send_text(text)


def router(service: RelayService) -> APIRouter:
    r = APIRouter(tags=["relay"])

    @r.post(relay.TICKET_PATH)
    async def relay_ticket(body: TicketRequest, node_id: NodeDep, core: CoreDep) -> dict[str, Any]:
        peer = core.state.peers.get(node_id)
        if peer is None:
            raise Forbidden("node removed or expired")
        if not 0 < body.region_id <= relay.MAX_REGION_ID:
            raise BadRequest("region_id must be a relay region id")
        if all(r.id != body.region_id for r in core.state.relays):
            raise NotFound(f"no relay region {body.region_id} in the relay map")
        text = ticket.make(
            node_id,
            peer.node_public_key,
            peer.wg_public_key,
            body.region_id,
            core.keys.active_seed,
            time.time(),
        )
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
