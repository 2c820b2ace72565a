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
import json
import logging

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
