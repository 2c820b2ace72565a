"""The relay ticket cache: one fetch at a time, kept until RENEW_BEFORE seconds before it expires."""

from __future__ import annotations

import asyncio

from meshd.relay.tickets import RENEW_BEFORE, TicketCache


class Coordinator:
    def __init__(self) -> None:
        self.now = 1000.0
        self.issued = 0

    def clock(self) -> float:
        return self.now

    async def tickets(self) -> tuple[str, float]:
        self.issued += 1
        await asyncio.sleep(0)  # a real request yields to the loop
        return f"ticket-{self.issued}", self.now + 600


async def test_concurrent_connects_share_one_fetch() -> None:
    c = Coordinator()
    cache = TicketCache(c.tickets, c.clock)
    assert not cache.due
    got = await asyncio.gather(*(cache.get() for _ in range(5)))
    assert got == [b"ticket-1"] * 5 and c.issued == 1


async def test_a_fresh_ticket_shortly_before_expiry_and_after_forget() -> None:
    c = Coordinator()
    cache = TicketCache(c.tickets, c.clock)
    await cache.get()
    c.now += 600 - RENEW_BEFORE - 1
    assert not cache.due and await cache.get() == b"ticket-1"
    c.now += 2
    assert cache.due and await cache.get() == b"ticket-2"
    cache.forget()
    assert not cache.due and await cache.get() == b"ticket-3"
