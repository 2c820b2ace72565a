"""pyroute2's async netlink calls, whatever event loop meshd runs on.

pyroute2's ``AsyncIPRoute``/``AsyncWireGuard`` open their netlink sockets as datagram endpoints of the
running loop; uvloop refuses datagram endpoints of family AF_NETLINK ("invalid family 16"). So on uvloop
(meshd/eventloop.py) every coroutine decorated with :func:`netlink_call` runs on a small asyncio loop of
its own in one daemon thread, and the caller awaits its result; on asyncio's own loop it runs inline, as
before. Netlink calls are few (the interface's set-up, an address change, the exit node's rules) and
short, so one thread serves them all, one after another as they come.

Cancellation propagates both ways: cancelling the awaiting task cancels the coroutine on the netlink
loop (``asyncio.wrap_future`` chains the cancellation to the concurrent future), and the caller sees
the coroutine's own exception or ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _netlink_loop() -> asyncio.AbstractEventLoop:
    """The netlink thread's asyncio loop, started on first use (a daemon thread: it dies with meshd)."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="meshd-netlink", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def needs_thread(loop: asyncio.AbstractEventLoop) -> bool:
    """True when ``loop`` cannot host pyroute2's netlink endpoints (it is not asyncio's own loop)."""
    return not isinstance(loop, asyncio.BaseEventLoop)


def netlink_call(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Run the decorated coroutine function where pyroute2 can open its sockets (see the module doc)."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        if not needs_thread(asyncio.get_running_loop()):
            return await fn(*args, **kwargs)
        future = asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), _netlink_loop())
        return await asyncio.wrap_future(future)

    return call
