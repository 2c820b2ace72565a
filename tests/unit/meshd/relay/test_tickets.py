"""The relay ticket cache: one ticket per region (a ticket names its region), one fetch per region at a
time, kept until RENEW_BEFORE seconds before it expires."""

from __future__ import annotations

import asyncio

from meshd.proto.ticket import Grant
from meshd.relay.tickets import RENEW_BEFORE, TicketCache


class Coordinator:
    def __init__(self) -> None:
        self.now = 1000.0
        self.issued = 0

    def clock(self) -> float:
        return self.now

    async def tickets(self, region_id: int) -> Grant:
        self.issued += 1
        await asyncio.sleep(0)  # a real request yields to the loop
        return Grant(f"ticket-{region_id}-{self.issued}", self.now + 600, lambda m: bytes(64))


async def test_concurrent_connects_share_one_fetch_per_region() -> None:
    c = Coordinator()
    cache = TicketCache(c.tickets, c.clock)
    assert not cache.due(1)
    got = await asyncio.gather(*(cache.get(1) for _ in range(5)))
    assert [g.ticket for g in got] == ["ticket-1-1"] * 5 and c.issued == 1
    assert (await cache.get(2)).ticket == "ticket-2-2" and c.issued == 2


async def test_a_fresh_ticket_shortly_before_expiry_and_after_forget() -> None:
    c = Coordinator()
    cache = TicketCache(c.tickets, c.clock)
    await cache.get(1)
    await cache.get(2)
    c.now += 600 - RENEW_BEFORE - 1
    assert not cache.due(1) and (await cache.get(1)).ticket == "ticket-1-1"
    c.now += 2
    assert cache.due(1) and (await cache.get(1)).ticket == "ticket-1-3"
    cache.forget(1)
    assert not cache.due(1) and (await cache.get(1)).ticket == "ticket-1-4"
    cache.forget()  # the key changed: every region's ticket goes
    assert not cache.due(2) and (await cache.get(2)).ticket == "ticket-2-5"
