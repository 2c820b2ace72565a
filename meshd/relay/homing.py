"""Choosing the relay home region, and choosing again when it stays unreachable: the I/O side of the pure
decisions in meshd.relay.home (links to every region, relay PING round trips, telling the winner it is
home). The relay manager (meshd.relay.manager) runs :func:`choose_home` as a supervised task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from meshd.relay import home as choose

if TYPE_CHECKING:
    from meshd.relay.manager import RelayManager

log = logging.getLogger("meshd.relay")

PROBE_INTERVAL = 0.05  #: choosing home: how often the open links are measured


async def choose_home(m: RelayManager) -> None:
    """Connect to every region, measure relay PING round trips, make the fastest the home region."""
    m.reconcile_links()
    loop = asyncio.get_running_loop()
    started = loop.time()
    best: int | None = None
    while best is None and m.regions:
        await asyncio.sleep(PROBE_INTERVAL)
        rtts: dict[int, float] = {}
        for rid, r in list(m.regions.items()):
            if (rtt := await r.measure(tries=3)) is not None:
                rtts[rid] = rtt
        best = choose.pick_home(rtts, m.regions, loop.time() - started)
    if best is None or best not in m.regions:
        return
    m.home = best
    r = m.regions[best]
    log.info("relay home region: %s (%s ms)", r.name, f"{r.rtt * 1000:.1f}" if r.rtt is not None else "?")
    link = r.open_link
    if link is not None:
        try:
            grant = await m.tickets.get(best)
            link.renew(m.wg_key, grant.ticket.encode("ascii"), home=True)
        except Exception as exc:  # the relay learns it is home at the next renewal instead
            log.warning("relay: telling %s it is home failed: %s", r.region.name, exc)
        m.set_up(True)
    m.reconcile_links()


def maybe_fail_over(m: RelayManager) -> bool:
    """The home region has been unreachable for HOME_FAILOVER seconds and there are others: choose the
    home again among those that answer (the old one is probed too and wins back if it returns)."""
    if not choose.fail_over_due(m.home_down_since, time.monotonic(), len(m.regions)):
        return False
    if m.closed or m.choosing:
        return False
    log.warning("relay home region unreachable for %.0f s: choosing another", choose.HOME_FAILOVER)
    m.home = None
    m.home_down_since = None
    m.start_probe()
    return True
