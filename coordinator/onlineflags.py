"""Online flags across a graceful restart (issue 16).

A node's online flag lives in memory only (it is whether the node holds a map stream). Before, a restart
started everyone offline and recorded a "restart" change, so every stream that came back asked for a
full map: O(N) each, O(N^2) bytes for the storm (about 25 GB at 10,000 nodes). Now a graceful stop
writes who was online, with the map version, to the `meta` table; the next start (same version: nothing
changed in between) takes those flags over and records a "resume" change that does not invalidate the
nodes' versions, so a node that resumes with ``since=V`` gets the small delta since V. A node that was
online and does not come back within :data:`GRACE` seconds is marked offline then (one transaction,
one delta to everyone). A crash (no record) or a record from another version falls back to full maps.

SQLite (one coordinator) only: with replicas on PostgreSQL each replica knows only its own streams, and
another replica's restart is already a no-op for the others' streams (core.Core._catch_up).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import weakref

from sqlalchemy.ext.asyncio import AsyncSession

from coordinator.core import Core
from coordinator.db.models import Meta

log = logging.getLogger("coordinator.presence")

META_KEY = "presence_at_stop"
#: seconds a node online before a restart stays online after it without a stream (meshd comes back within
#: 15 s of a restart close, then retries every 3 s at most: RESTART_SPREAD, RESTART_RETRY_MAX)
GRACE = 60.0


async def save(core: Core) -> None:
    """At a graceful stop: who is online now, at which map version."""
    online = sorted(i for i, p in core.state.peers.items() if p.online)
    record = json.dumps({"version": core.state.version, "online": online}, separators=(",", ":"))
    async with core.transaction() as tx:
        row = await tx.session.get(Meta, META_KEY)
        if row is None:
            tx.session.add(Meta(key=META_KEY, value=record))
        else:
            row.value = record


async def take(session: AsyncSession, version: int) -> frozenset[int] | None:
    """At start (in the start transaction): the nodes online at the last stop, if it was graceful and
    nothing changed since (`version` is the newest map version in the database). The record is deleted:
    it holds for this start only."""
    row = await session.get(Meta, META_KEY)
    if row is None:
        return None
    await session.delete(row)
    try:
        record = json.loads(row.value)
        if int(record["version"]) != version:
            return None
        return frozenset(int(i) for i in record["online"])
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable presence record at start: streams get full maps")
        return None


async def settle(core: Core, online: frozenset[int], grace: float = GRACE) -> None:
    """After `grace` seconds, mark offline the nodes of `online` that did not open a stream again."""
    await asyncio.sleep(grace)

    def absent() -> list[int]:
        peers = core.state.peers
        return [i for i in sorted(online) if i not in core.hub.subscribers and i in peers and peers[i].online]

    gone = absent()
    if not gone:
        return
    async with core.transaction() as tx:
        for node_id in gone:
            tx.change("presence", node_id)

        def commit() -> None:
            for node_id in absent():  # one that came back during the commit stays online
                core.state.set_endpoints(node_id, None, False)

        tx.on_commit(commit)
    log.info("%d nodes online before the restart did not come back within %.0f s", len(gone), grace)


class PresenceWriter:
    """Group commit of online flags: the flags of streams that open or close while a write is under way
    are written together in the next transaction (one "presence" change per node whose flag flips), so a
    connect storm of thousands of streams costs a few commits instead of one fsync'd commit per stream."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.waiting: dict[int, tuple[bool, list[asyncio.Future[None]]]] = {}
        self.task: asyncio.Task[None] | None = None

    async def write(self, node_id: int, online: bool) -> None:
        """Set the node's flag; returns once committed (and the change is on its way to the hub)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        _, waiters = self.waiting.get(node_id, (online, []))
        waiters.append(done)
        self.waiting[node_id] = (online, waiters)  # the last report wins, as in the coalescer
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._flush(), name="presence-writer")
            self.core.held_writes.add(self.task)  # cancelled by Core.stop
            self.task.add_done_callback(self.core.held_writes.discard)
        await done

    async def _flush(self) -> None:
        core = self.core
        while self.waiting:
            batch, self.waiting = self.waiting, {}
            try:
                async with core.transaction() as tx:
                    flips = _flips(core, batch)
                    for node_id in flips:
                        tx.change("presence", node_id)
                    tx.on_commit(functools.partial(_apply, core, flips))
            except Exception as exc:  # every waiter fails as its own transaction would have
                for _, waiters in batch.values():
                    for w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                continue
            for _, waiters in batch.values():
                for w in waiters:
                    if not w.done():
                        w.set_result(None)


def _flips(core: Core, batch: dict[int, tuple[bool, list[asyncio.Future[None]]]]) -> dict[int, bool]:
    """The flags of `batch` that differ from the map's."""
    peers = core.state.peers
    return {i: on for i, (on, _) in batch.items() if (p := peers.get(i)) is not None and p.online != on}


def _apply(core: Core, flips: dict[int, bool]) -> None:
    for node_id, on in flips.items():
        core.state.set_endpoints(node_id, None, on)


_writers: weakref.WeakKeyDictionary[Core, PresenceWriter] = weakref.WeakKeyDictionary()


def writer(core: Core) -> PresenceWriter:
    """The core's presence writer (one per core: tests build several)."""
    found = _writers.get(core)
    if found is None:
        found = _writers[core] = PresenceWriter(core)
    return found
