"""Garbage collection in a long-running coordinator (issue 16).

At 10,000 streams CPython's full (generation 2) collections took 1.0-1.5 s each, about forty of them in
three minutes, and found next to nothing (0-20 objects; measured with ``gc.callbacks`` under
benchmarks/coordinator_scale.py). The heap is long-lived state (the map, 10,000 subscribers, their sockets
and tasks), every collection walks all of it, and the event loop stands still meanwhile: in each 10,000-node
run one admin change in five reached the nodes 1.3 s late (p99 1.5-1.8 s against 0.3-0.5 s for the others).

So what has survived a while goes to the permanent generation (``gc.freeze``) and full collections walk
only what came after. Cyclic garbage among frozen objects (a stream's objects after it closed) is not
reclaimed while frozen: once an hour everything is unfrozen and collected once, one pause an hour
instead of one every few seconds. Only `coordinator serve` runs this; tests and tools keep the default.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("coordinator")

FREEZE_EVERY = 30.0  #: seconds between moving survivors to the permanent generation
THAW_EVERY = 3600.0  #: seconds between full collections of everything (frozen cyclic garbage reclaimed)


def freeze_survivors() -> None:
    """Collect the young generations, then freeze what is left (young garbage is not frozen with it)."""
    gc.collect(1)
    gc.freeze()


def thaw_and_collect() -> int:
    """Unfreeze everything and run one full collection; returns the objects it found unreachable."""
    gc.unfreeze()
    return gc.collect()


async def run(*, clock: Callable[[], float] = time.monotonic) -> None:
    """The policy (run it supervised, from the moment the coordinator's state is loaded)."""
    freeze_survivors()  # the state loaded at start
    thawed = clock()
    while True:
        await asyncio.sleep(FREEZE_EVERY)
        if clock() - thawed >= THAW_EVERY:
            t0 = time.perf_counter()
            found = thaw_and_collect()
            thawed = clock()
            log.info("full collection: %d unreachable, %.0f ms", found, (time.perf_counter() - t0) * 1000)
        freeze_survivors()
