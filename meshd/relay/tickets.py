"""The relay tickets the client presents in CLIENT_HELLO, one per region (a ticket names its region):
fetched from the coordinator when there is none or it expires within :data:`RENEW_BEFORE` seconds, one
fetch per region at a time, kept otherwise. A grant also carries the signer of the node key, which signs
each relay's challenge (the ticket alone opens nothing)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from meshd.proto.ticket import Grant

RENEW_BEFORE = 100.0  #: seconds before a ticket's not_after that a fresh one is fetched

TicketSource = Callable[[int], Awaitable[Grant]]  #: region id -> a ticket for it and the node key's signer


class TicketCache:
    def __init__(self, source: TicketSource, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.clock = clock
        self._grants: dict[int, Grant] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def due(self, region_id: int) -> bool:
        """A ticket for this region is held and it is time to renew it over the open link."""
        g = self._grants.get(region_id)
        return g is not None and self.clock() > g.not_after - RENEW_BEFORE

    def forget(self, region_id: int | None = None) -> None:
        """The relay refused the ticket (or our key changed, region None: all of them): fetch anew."""
        if region_id is None:
            self._grants.clear()
        else:
            self._grants.pop(region_id, None)

    async def get(self, region_id: int) -> Grant:
        async with self._locks.setdefault(region_id, asyncio.Lock()):
            g = self._grants.get(region_id)
            if g is None or self.clock() > g.not_after - RENEW_BEFORE:
                g = self._grants[region_id] = await self.source(region_id)
            return g
