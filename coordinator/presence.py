"""Which nodes are online, across coordinator replicas on one PostgreSQL database (issue 16).

A node is online while it holds a map stream on some replica. Each replica owns a row in ``replicas``
(its heartbeat, written every HEARTBEAT seconds in the *database's* clock, so replicas on machines whose
clocks disagree still agree on who is late) and a row in ``node_presence`` per node streaming to it. A
node is online while it has a presence row; the presence rows of a replica not seen for REPLICA_TIMEOUT
are deleted by whichever live replica notices first, and its nodes go offline (a "presence" change every
replica applies) unless they already reconnected elsewhere. So a dead replica's nodes are offline on every
replica's admin API and map within REPLICA_TIMEOUT + HEARTBEAT seconds (12 s), or online again as soon as
they reconnect to a surviving replica (meshd fails over within 5 s). A replica that stops cleanly keeps
its rows for LEAVE_GRACE seconds (Presence.leave): a restart storm's reconnects are no map changes.

Why heartbeat rows and not session advisory locks (a lock held by a replica's connection is released the
moment PostgreSQL sees the connection die): a replica whose machine or network vanished leaves a half-open
connection that PostgreSQL only notices after TCP keepalive (2 h by default), so the bound would be the
kernel's, not ours; rows in the database's clock bound it for every kind of death, cost one small UPDATE
per replica every 2 s, and are plain data the admin can read (`SELECT * FROM replicas`). A replica that
was only slow (declared dead, then back) finds its row gone and writes its presence again.

SQLite (one replica) keeps no rows: the in-memory flag is the truth there, as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator import replicarelays
from coordinator.db.models import NodePresence, Replica

if TYPE_CHECKING:
    from coordinator.core import Core

log = logging.getLogger("coordinator")

HEARTBEAT = 2.0  #: seconds between a replica's heartbeats
REPLICA_TIMEOUT = 10.0  #: a replica not seen this long is dead: its nodes' presence is dropped
#: seconds the nodes of a replica that stopped cleanly stay online without a stream (as on SQLite,
#: coordinator/onlineflags.py: meshd comes back within 15 s of a restart close, then retries every 3 s)
LEAVE_GRACE = 60.0


async def db_now(session: AsyncSession) -> float:
    """The database server's clock (unix seconds): the one clock all replicas share."""
    return float((await session.execute(text("SELECT extract(epoch from clock_timestamp())"))).scalar_one())


class Presence:
    """One replica's part: its heartbeat row, its nodes' presence rows, reaping dead replicas."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.id = uuid.uuid4().hex
        self.name = f"{socket.gethostname()}:{os.getpid()}"[:255]
        self.timeout = REPLICA_TIMEOUT
        self.heartbeat = HEARTBEAT
        self.grace = LEAVE_GRACE  #: seconds our nodes stay online after a clean stop (leave)
        #: this replica's relay region as written into its row (coordinator/replicarelays.py)
        self.relay: str | None = None

    async def register(self, session: AsyncSession) -> None:
        now = await db_now(session)
        session.add(Replica(id=self.id, name=self.name, started_at=now, last_seen=now, relay=self.relay))

    async def online_among(self, session: AsyncSession, ids: Iterable[int] | None = None) -> set[int]:
        """Node ids (of `ids`, or all) with a presence row on a replica that is not late."""
        floor = await db_now(session) - self.timeout
        q = (
            select(NodePresence.node_id)
            .join(Replica, Replica.id == NodePresence.replica_id)
            .where(Replica.last_seen >= floor)
        )
        if ids is not None:
            wanted = list(ids)
            if not wanted:
                return set()
            q = q.where(NodePresence.node_id.in_(wanted))
        return set((await session.execute(q)).scalars().all())

    async def set_local(self, session: AsyncSession, node_id: int, up: bool) -> bool:
        """Record that `node_id` does (not) stream to this replica; whether it is online on any replica."""
        if up:
            await session.execute(
                pg_insert(NodePresence)
                .values(node_id=node_id, replica_id=self.id, since=time.time())
                .on_conflict_do_nothing()
            )
            return True
        await session.execute(
            delete(NodePresence).where(NodePresence.node_id == node_id, NodePresence.replica_id == self.id)
        )
        return bool(await self.online_among(session, [node_id]))

    async def beat(self) -> bool:
        """Write the heartbeat (outside the write lock: it must not wait behind big writes). False when our
        row was gone: another replica declared us dead and dropped our nodes' presence."""
        async with self.core.sessions() as s, s.begin():
            now = await db_now(s)
            result = await s.execute(update(Replica).where(Replica.id == self.id).values(last_seen=now))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def anyone_late(self) -> bool:
        """A cheap read before the write lock is taken: is some replica's heartbeat older than the timeout?"""
        async with self.core.sessions() as s:
            now = await db_now(s)
            late = await s.execute(select(Replica.id).where(Replica.last_seen < now - self.timeout).limit(1))
            return late.first() is not None

    async def reap(self, alive: bool = True) -> None:
        """Drop dead replicas' presence (their nodes go offline unless streaming elsewhere); re-register
        when we were taken for dead ourselves (`alive` False: our heartbeat found no row)."""
        from coordinator import nodes  # it imports coordinator.core

        core = self.core
        async with core.transaction() as tx:
            s = tx.session
            now = await db_now(s)
            touched: set[int] = set()
            if not alive:
                log.warning(
                    "this replica was taken for dead (no heartbeat for %.0f s): re-registering", self.timeout
                )
                await s.execute(delete(NodePresence).where(NodePresence.replica_id == self.id))
                s.add(Replica(id=self.id, name=self.name, started_at=now, last_seen=now, relay=self.relay))
                await s.flush()
                mine = [i for i, subs in core.hub.subscribers.items() if subs and i in core.state.peers]
                for i in mine:
                    s.add(NodePresence(node_id=i, replica_id=self.id, since=time.time()))
                touched.update(mine)
            dead, orphans = await self.drop_dead(s, now)
            touched.update(orphans)
            await s.flush()
            if dead or not alive:
                # a replica's relay region left (or ours came back): every replica re-reads the regions
                tx.change("relays")
                tx.on_commit(await replicarelays.refresh(core, s))
            online = await self.online_among(s, touched)
            for i in sorted(touched):
                peer = core.state.peers.get(i)
                up = i in online
                if peer is not None and peer.online != up:
                    tx.change("presence", i)
                    tx.on_commit(nodes.presence_applier(core, i, up))

    async def drop_dead(self, s: AsyncSession, now: float) -> tuple[list[str], set[int]]:
        """Delete the rows of replicas not seen for the timeout; their ids, and the nodes whose presence
        went with them."""
        dead = list(
            (await s.execute(select(Replica.id).where(Replica.last_seen < now - self.timeout))).scalars()
        )
        if not dead:
            return [], set()
        orphans = set(
            (await s.execute(select(NodePresence.node_id).where(NodePresence.replica_id.in_(dead)))).scalars()
        )
        await s.execute(delete(NodePresence).where(NodePresence.replica_id.in_(dead)))
        await s.execute(delete(Replica).where(Replica.id.in_(dead)))
        log.info("replica(s) %s missed their heartbeat: their nodes' presence dropped", ", ".join(dead))
        return dead, orphans

    async def leave(self) -> None:
        """At a clean stop: our nodes stay online for `grace` seconds (they reconnect to another replica,
        or to this one restarted, within it); then a live replica's heartbeat reaps our row as a dead
        replica's (Presence.reap), and those not streaming elsewhere go offline, in one change (a
        starting replica does the same if none is live then).

        Why not drop the rows at once: a restart of every replica closes every stream at once. Dropping
        them made each node offline (a change touching every node) and each reconnect online again (one
        more change per node), so every resuming stream needed a delta naming thousands of nodes, built
        and signed for it alone: O(N) each, O(N^2) for the storm (10,000 nodes did not come back in a
        minute). Kept, a reconnect only adds a presence row: no map change, and the streams resuming
        from one version share a signed frame per view (coordinator/api/stream.py). SQLite keeps the
        flags over a graceful restart the same way (coordinator/onlineflags.py, the same 60 s)."""
        async with self.core.transaction() as tx:
            s = tx.session
            # late by `timeout` once `grace` has passed; no relay region any more (our relay is gone)
            until = await db_now(s) + self.grace - self.timeout
            await s.execute(update(Replica).where(Replica.id == self.id).values(last_seen=until, relay=None))
            if self.relay is not None:
                tx.change("relays")  # the others drop our relay region from their relay maps

    async def run(self) -> None:
        """The heartbeat, every `heartbeat` seconds whatever else is going on: it takes no write lock (a
        queue of writes behind it would make a busy replica look dead); the reaping after it takes the
        lock only when some replica is late or our row was gone."""
        reaping: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(self.heartbeat)
                try:
                    alive = await self.beat()
                    if (reaping is None or reaping.done()) and (not alive or await self.anyone_late()):
                        reaping = asyncio.create_task(self.reap(alive), name="replica-reaper")
                        reaping.add_done_callback(_log_failure)
                except Exception:  # pragma: no cover - database away: the next beat retries
                    log.warning("replica heartbeat failed; retrying", exc_info=True)
        finally:
            if reaping is not None:
                reaping.cancel()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("reaping dead replicas failed; the next heartbeat retries", exc_info=task.exception())
