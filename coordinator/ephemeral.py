"""Ephemeral nodes (issue 17): enrolled with a key made by ``coordinator keys create --ephemeral``, removed
when they have been offline longer than ``ephemeral_timeout`` (``coordinator serve --ephemeral-timeout``,
default 3 minutes) and at once when their daemon says it leaves (``meshd down``: ``POST /api/v1/leave``).

A removal is an ordinary ``nodes.remove_node`` (audited as ``node.removed`` with the reason, actor
``coordinator`` or the node itself): the node is revoked at once, and its name and address go to no new
node before the quarantine ends (setting ``quarantine``), then return to the pool. CI runners and
autoscaled machines that come and go therefore leave no stale nodes behind.

:class:`OfflineClock` is the sans-IO part (which ephemeral nodes have been offline too long, given what
is online now and the time); :func:`run` is the shell the coordinator starts, one tick per
``tick(timeout)`` seconds. A node counts as offline from the first tick that sees it offline, and a
coordinator that just started counts every ephemeral node as offline from its start: one that never
reconnects is removed a timeout after the restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from sqlalchemy import select

from coordinator import nodes
from coordinator.core import Core
from coordinator.db.models import Node
from coordinator.errors import NotFound

log = logging.getLogger("coordinator.ephemeral")

DEFAULT_TIMEOUT = 180.0


def tick(timeout: float) -> float:
    """Seconds between checks: a tenth of the timeout, between 0.2 s and 5 s."""
    return min(5.0, max(0.2, timeout / 10))


class OfflineClock:
    """Since when each ephemeral node has been offline; which ones are due for removal."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.offline_since: dict[int, float] = {}

    def due(self, online: Mapping[int, bool], now: float) -> list[int]:
        """`online`: every ephemeral node id -> whether it is online now. The ids offline longer than
        the timeout, in id order; nodes no longer listed are forgotten."""
        for node_id in [i for i in self.offline_since if i not in online]:
            del self.offline_since[node_id]
        out = []
        for node_id, up in sorted(online.items()):
            if up:
                self.offline_since.pop(node_id, None)
                continue
            since = self.offline_since.setdefault(node_id, now)
            if now - since >= self.timeout:
                out.append(node_id)
        return out


async def sweep(core: Core, clock: OfflineClock, now: float) -> list[str]:
    """One check: remove the ephemeral nodes offline too long; their names."""
    async with core.read() as s:
        rows = (await s.execute(select(Node.id, Node.name).where(Node.ephemeral.is_(True)))).all()
    names = {i: name for i, name in rows}
    online = {i: bool((p := core.state.peers.get(i)) is not None and p.online) for i in names}
    removed = []
    for node_id in clock.due(online, now):
        offline = now - clock.offline_since.pop(node_id, now)
        try:
            await nodes.remove_node(
                core,
                names[node_id],
                "coordinator",
                details={"ephemeral": True, "reason": f"offline for {offline:.0f} s"},
            )
        except NotFound:  # removed meanwhile (by an admin, or by another replica)
            continue
        removed.append(names[node_id])
        log.info("ephemeral node %s removed: offline for %.0f s", names[node_id], offline)
    return removed


async def run(core: Core, after: float) -> None:
    """The reaper loop (cancelled at stop); a failing check is logged and retried at the next tick."""
    clock = OfflineClock(after)
    while True:
        try:
            await sweep(core, clock, time.monotonic())
        except Exception:
            log.exception("ephemeral node check failed; retrying")
        await asyncio.sleep(tick(after))


async def leave(core: Core, node_id: int) -> bool:
    """The node's daemon is going down (``meshd down``): an ephemeral node is removed at once. False
    (and nothing done) for a node that is not ephemeral."""
    async with core.read() as s:
        node = await s.get(Node, node_id)
    if node is None or not node.ephemeral:
        return False
    try:
        await nodes.remove_node(
            core, node.name, f"node:{node.name}", details={"ephemeral": True, "reason": "meshd down"}
        )
    except NotFound:
        return False
    log.info("ephemeral node %s removed: it left (meshd down)", node.name)
    return True
