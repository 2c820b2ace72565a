"""The relay ticket the client presents in CLIENT_HELLO: fetched from the coordinator when there is none
or it expires within :data:`RENEW_BEFORE` seconds, one fetch at a time, kept otherwise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

RENEW_BEFORE = 100.0  #: seconds before a ticket's not_after that a fresh one is fetched

TicketSource = Callable[[], Awaitable[tuple[str, float]]]  #: -> (ticket, not_after unix seconds)


class TicketCache:
    def __init__(self, source: TicketSource, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.clock = clock
        self._ticket: tuple[bytes, float] | None = None
        self._lock = asyncio.Lock()

    @property
    def due(self) -> bool:
        """A ticket is held and it is time to renew it over the open links."""
        return self._ticket is not None and self.clock() > self._ticket[1] - RENEW_BEFORE

    def forget(self) -> None:
        """The relay refused the ticket (or our key changed): fetch a new one next time."""
        self._ticket = None

    async def get(self) -> bytes:
        async with self._lock:
            if self._ticket is None or self.clock() > self._ticket[1] - RENEW_BEFORE:
                text, not_after = await self.source()
                self._ticket = (text.encode("ascii"), not_after)
            return self._ticket[0]
