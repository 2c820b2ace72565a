"""Supervised background tasks: none dies silently, cancellation always propagates.

Every long-running loop in meshd (the control stream, renewal, address watch, rotation, relay links,
traversal timers, port maps) runs under :func:`supervise`. When the loop raises anything but
``CancelledError`` the traceback is logged and the loop starts again after a backoff that doubles up to
``backoff_max`` (and resets once a run lasted longer than ``healthy_after``). A loop that keeps failing
``give_up_after`` times in a row is handed to ``on_fatal``: the daemon then exits non-zero so that
systemd restarts it, rather than staying up with a dead loop while ``meshd status`` says all is well.

``CancelledError`` is never swallowed: cancelling the supervising task cancels the loop and the
supervisor returns by raising it, like any other task.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("meshd.supervise")

LoopFactory = Callable[[], Coroutine[Any, Any, None]]


class Transient(Exception):
    """A failure a loop expects and recovers from by being restarted (an address not there yet, e.g. a
    bind on an interface that is being made or torn down): logged as one line, without a traceback."""


async def supervise(
    name: str,
    factory: LoopFactory,
    *,
    backoff_min: float = 0.5,
    backoff_max: float = 30.0,
    healthy_after: float = 60.0,
    give_up_after: int | None = None,
    on_fatal: Callable[[str, BaseException], None] | None = None,
    sleep: Callable[[float], Coroutine[Any, Any, None]] = asyncio.sleep,
) -> None:
    """Run ``factory()`` until it returns; restart it with backoff when it raises."""
    loop = asyncio.get_running_loop()
    delay = backoff_min
    failures = 0
    while True:
        started = loop.time()
        try:
            await factory()
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if loop.time() - started > healthy_after:
                delay, failures = backoff_min, 0
            failures += 1
            if isinstance(e, Transient):
                log.warning("task %s: %s (%d in a row); restarting in %.1f s", name, e, failures, delay)
            else:
                log.error(
                    "task %s failed (%d in a row); restarting in %.1f s", name, failures, delay, exc_info=e
                )
            if give_up_after is not None and failures >= give_up_after:
                if on_fatal is not None:
                    on_fatal(name, e)
                return
            await sleep(delay * random.uniform(0.9, 1.1))
            delay = min(backoff_max, delay * 2)


class TaskGroup:
    """A set of supervised tasks started together and stopped together.

    Unlike :class:`asyncio.TaskGroup` it does not need one ``async with`` block around their whole life
    (the daemon starts pieces at different moments) and one failing task never cancels the others:
    failures are the supervisor's business.
    """

    def __init__(self, on_fatal: Callable[[str, BaseException], None] | None = None) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        self._on_fatal = on_fatal

    def start(self, name: str, factory: LoopFactory, **kw: Any) -> asyncio.Task[None]:
        kw.setdefault("on_fatal", self._on_fatal)
        task = asyncio.create_task(supervise(name, factory, **kw), name=name)
        self._tasks.append(task)
        return task

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return [t for t in self._tasks if not t.done()]

    async def stop(self, within: float = 2.0) -> None:
        """Cancel every task and wait (at most ``within`` s) for them to finish."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=within)
            for t in pending:
                log.warning("task %s did not stop within %.1f s", t.get_name(), within)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.error("task %s ended with an error", t.get_name(), exc_info=t.exception())
