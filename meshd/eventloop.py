"""The event loop both programs run on: uvloop when it is installed, asyncio's own otherwise.

The relay data path (meshd's local proxies and relay links, the coordinator's relay hub and UDP relay
ports) is per-packet event-loop work: uvloop (libuv, Cython transports) costs fewer CPU cycles per read
and write than the pure-Python selector loop, and reads up to 32 datagrams per readiness event where
asyncio reads one, which is what lets the proxies hand several packets to the relay at once. Nothing in
either program depends on which loop runs: uvloop is a drop-in ``asyncio`` loop, and without it (a
platform without wheels, a trimmed install) everything works the same, only slower.

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
