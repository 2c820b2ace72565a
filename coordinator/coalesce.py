"""Coalesced writes per key: a burst, then one per interval, the last value offered in between wins.

A node that flaps (its candidates, its online flag, its relay home) would otherwise cost a database write
and a delta to every peer that sees it for each flap. :class:`HeldWrites` is the sans-IO rule (the caller
passes ``now``); :class:`Coalescer` is its asyncio shell, which writes held values when their window ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger("coordinator.coalesce")


@dataclass
class _Window(Generic[V]):
    credit: float  #: writes that may go out at once (refills one per interval, up to the burst)
    last: float  #: when ``credit`` was last counted
    held: V | None = None  #: the value waiting for the window to end (values are never None)


class HeldWrites(Generic[K, V]):
    """Per key: ``burst`` writes at once, then one per ``interval`` seconds.

    :meth:`offer` says whether a value may be written now; if not it is held (replacing any value held
    before) until :meth:`due_at`, when the caller takes it with :meth:`take`. At most ``max_keys`` keys
    are remembered: beyond that, keys with nothing held whose credit has refilled are forgotten.
    """

    def __init__(self, interval: float, burst: float, max_keys: int = 100_000) -> None:
        self.interval, self.burst, self.max_keys = interval, burst, max_keys
        self._windows: dict[K, _Window[V]] = {}

    def _refill(self, w: _Window[V], now: float) -> None:
        w.credit = min(self.burst, w.credit + (now - w.last) / self.interval)
        w.last = now

    def offer(self, key: K, value: V, now: float) -> bool:
        """True: write ``value`` now (counted). False: it is held; write it at :meth:`due_at`."""
        w = self._windows.get(key)
        if w is None:
            if len(self._windows) >= self.max_keys:
                self._forget_idle(now)
            w = self._windows[key] = _Window(credit=self.burst, last=now)
        self._refill(w, now)
        if w.held is not None or w.credit < 1:
            w.held = value
            return False
        w.credit -= 1
        return True

    def due_at(self, key: K) -> float | None:
        """When the value held for ``key`` may be written, or None if nothing is held."""
        w = self._windows.get(key)
        if w is None or w.held is None:
            return None
        return w.last + (1 - w.credit) * self.interval

    def take(self, key: K, now: float) -> V | None:
        """The held value (counted as a write), or None when nothing is held."""
        w = self._windows.get(key)
        if w is None or w.held is None:
            return None
        self._refill(w, now)
        value, w.held = w.held, None
        w.credit -= 1
        return value

    def _forget_idle(self, now: float) -> None:
        for k in [
            k
            for k, w in self._windows.items()
            if w.held is None and w.credit + (now - w.last) / self.interval >= self.burst
        ]:
            del self._windows[k]


class Coalescer(Generic[K, V]):
    """The asyncio shell: ``submit`` writes at once or holds; held values are written when due.

    ``write`` performs one write; ``tasks`` collects the delayed writes so that the owner can cancel
    them on shutdown. A delayed write that fails is logged: the next report of the same key retries.
    """

    def __init__(
        self,
        rule: HeldWrites[K, V],
        write: Callable[[K, V], Awaitable[None]],
        *,
        clock: Callable[[], float],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self.rule, self.write, self.clock, self.tasks = rule, write, clock, tasks
        self._scheduled: set[K] = set()

    async def submit(self, key: K, value: V) -> None:
        if self.rule.offer(key, value, self.clock()):
            await self.write(key, value)
            return
        if key in self._scheduled:
            return  # the delayed write takes the newest value
        self._scheduled.add(key)
        task = asyncio.get_running_loop().create_task(self._later(key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _later(self, key: K) -> None:
        try:
            due = self.rule.due_at(key)
            if due is not None:
                await asyncio.sleep(max(0.0, due - self.clock()))
        finally:
            self._scheduled.discard(key)
        if (value := self.rule.take(key, self.clock())) is None:
            return
        try:
            await self.write(key, value)
        except Exception as exc:  # a background write: log; the node's next report retries
            log.warning("held write for %r failed: %s", key, exc)
