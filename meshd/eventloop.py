"""The event loop of both programs (``meshd up``, ``coordinator serve``, ``coordinator relay serve``):
uvloop when it is installed, asyncio's own otherwise.

The relay data paths (the relay hub's TCP clients, meshd's relay link and proxies, the UDP relay ports)
are per-packet event-loop work: uvloop (libuv, Cython transports) costs fewer CPU cycles per read and
write than the pure-Python selector loop. Nothing depends on which loop runs: uvloop is a drop-in
``asyncio`` loop (its transports are no subclasses of asyncio's, so nothing checks
``isinstance(transport, asyncio.Transport)``), and without it (no wheel for the platform, a trimmed
install) everything works the same, only slower.

One thing uvloop cannot do: pyroute2's async netlink sockets are datagram endpoints of family
AF_NETLINK, which uvloop's ``create_datagram_endpoint`` refuses ("invalid family 16"). meshd's netlink
calls therefore run on a small asyncio loop of their own in a thread when the main loop is uvloop
(:mod:`meshd.netlink`).

``MESH_EVENT_LOOP=asyncio`` in the environment forces asyncio's loop (benchmarks/relay_throughput.py
compares both in one run; also a way out should uvloop ever misbehave on some system).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "MESH_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None (asyncio's default) when it is missing or not wanted."""
    if os.environ.get(ENV, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def name() -> str:
    """Which loop :func:`run` would use: ``uvloop`` or ``asyncio`` (for logs and benchmarks)."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks (same semantics: a fresh loop, the
    remaining tasks cancelled and async generators closed at the end)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def running_name() -> str:
    """The running loop's kind, ``uvloop`` or ``asyncio`` (meshd's first log line says which)."""
    loop = asyncio.get_running_loop()
    return "asyncio" if isinstance(loop, asyncio.BaseEventLoop) else type(loop).__module__.split(".")[0]
