"""Keeping one relay region's link up: get a ticket, connect (the region's IPv4 URL first, its IPv6 one
last: meshd.relay.dualstack), serve until the link drops, reconnect with backoff and jitter.

The relay manager (meshd.relay.manager) runs :func:`run_region` as one supervised task per region it
wants. When the home region stays unreachable the loop hands over to the home fail-over
(meshd.relay.homing) and ends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from meshd.relay import homing
from meshd.relay import link as rlink
from meshd.relay.dualstack import relay_urls
from meshd.relay.region import RegionLink

if TYPE_CHECKING:
    from meshd.relay.manager import RelayManager

log = logging.getLogger("meshd.relay")

BACKOFF_MIN = 0.2
BACKOFF_MAX = 3.0


async def run_region(m: RelayManager, rid: int, r: RegionLink) -> None:
    """Keep region ``rid``'s link up until the manager closes or no longer wants the region."""
    delay = BACKOFF_MIN
    linked_before = False
    while not m.closed:
        try:
            link = await _connect(m, rid, r)
        except Exception as exc:  # expected: network trouble, refused ticket, coordinator down, bad URL
            r.error = str(exc)
            log.warning("relay %s: %s; retrying in %.1f s", r.name, exc, delay)
            if rid == m.home:
                m.home_down_since = m.home_down_since or time.monotonic()
                if homing.maybe_fail_over(m):
                    return
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(BACKOFF_MAX, delay * 2)
            continue
        if m.closed or m.regions.get(rid) is not r:
            link.close("relay client stopped")  # stopped while connecting: keep nothing open
            return
        delay = BACKOFF_MIN
        if linked_before:
            m.reconnects[rid] = m.reconnects.get(rid, 0) + 1
        linked_before = True
        await _serve(m, rid, r, link)


async def _connect(m: RelayManager, rid: int, r: RegionLink) -> rlink.RelayLink:
    """One link to the region, through the first of its URLs that answers."""
    grant = await m.tickets.get(rid)
    urls = relay_urls(r.region)  # its IPv6 address last (issue 15: IPv6-only nodes)
    for i, url in enumerate(urls):
        try:
            return await rlink.connect(
                url,
                m.wg_key,
                grant.ticket.encode("ascii"),
                sign=grant.sign,
                region_id=rid,
                home=rid == m.home,
                on_packet=m.received,
                ssl_context=m.ssl_context,
            )
        except rlink.RelayLinkError as exc:
            if i == len(urls) - 1:
                raise
            log.debug("relay %s: %s; trying %s", r.name, exc, urls[i + 1])
    raise rlink.RelayLinkError(f"relay {r.name}: no URL")


async def _serve(m: RelayManager, rid: int, r: RegionLink, link: rlink.RelayLink) -> None:
    r.attach(link)
    m.udp.session_up(rid, link)
    if rid == m.home:
        m.home_down_since = None
        m.set_up(True)
    try:
        reason = await r.wait_closed(link)
    finally:
        m.udp.session_lost(rid)
    if rid == m.home:
        m.set_up(False)
        m.home_down_since = time.monotonic()
    if "ticket" in reason or "removed" in reason or "rotated" in reason:
        m.tickets.forget(rid)
