"""The kernel fast path's ``nft``/``conntrack`` runs on a thread of its own, never on the event loop.

Installing one pair's forwarding is a dozen short processes (the table, six rules, the old flows of both
ports: ``conntrack -D`` alone is ~14 ms each): 50-150 ms during which a relay's event loop did nothing
else. In the coordinator that loop also carries the TCP relay, the map streams and enrollment, so every
packet relayed then waited: the benchmark's first ping through a fresh pair came ~90 ms late (issue 15),
and a hundred pairs bound at once would have stalled the coordinator for seconds. The port server holds
the pair's "bound" state back until the rules are in (meshd.relay.portserver), so the nodes go on over
the TCP relay meanwhile and no packet is forwarded in userspace while the kernel takes over.

One worker, so installs, removals and counter reads happen in the order they were asked for; ``counters``
answers from the last read and asks for a new one at most every ``COUNTER_EVERY`` s; ``close`` waits for
what is queued (the table goes after the last rule), bounded by the processes' own timeouts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from meshd.proto.relayport import Allocation
from meshd.relay.udpkernel import COUNTER_EVERY, NftError, NftForwarder

log = logging.getLogger("meshd.relay.ports")


class ForwarderThread:
    """A :class:`~meshd.relay.portserver.KernelForwarder` that hands the work to one worker thread."""

    def __init__(self, forwarder: NftForwarder, *, counter_every: float = COUNTER_EVERY) -> None:
        self.forwarder = forwarder
        self.counter_every = counter_every
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-nft")
        self._lock = threading.Lock()
        self._counters: dict[int, tuple[int, int, int, int]] = {}  #: id(alloc) -> last read
        self._read_at = 0.0
        self._reading: Future[None] | None = None
        self._closed = False

    def install(self, alloc: Allocation, done: Callable[[], None]) -> None:
        """Install ``alloc``'s forwarding; ``done()`` follows on the worker thread, also when nft refused
        (the pair then stays in userspace) or when closed before it ran."""
        if self._submit(self._install, alloc, done) is None:
            done()

    def remove(self, alloc: Allocation) -> None:
        self._submit(self._remove, alloc)

    def counters(self, alloc: Allocation) -> tuple[int, int, int, int] | None:
        now = time.monotonic()
        if now - self._read_at >= self.counter_every and (self._reading is None or self._reading.done()):
            self._read_at = now
            self._reading = self._submit(self._read, alloc)
        with self._lock:
            return self._counters.get(id(alloc))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.submit(self.forwarder.close)
        self._pool.shutdown(wait=True)

    def drain(self) -> None:
        """Until everything asked so far was done (tests)."""
        if not self._closed:
            self._pool.submit(lambda: None).result()

    def _submit(
        self, job: Callable[[Allocation], None], alloc: Allocation, done: Callable[[], None] | None = None
    ) -> Future[None] | None:
        if self._closed:
            return None
        return self._pool.submit(self._guarded, job, alloc, done)

    # -- on the worker ----------------------------------------------------------------------------------
    @staticmethod
    def _guarded(
        job: Callable[[Allocation], None], alloc: Allocation, done: Callable[[], None] | None
    ) -> None:
        try:
            job(alloc)
        except Exception as exc:  # nft refused: userspace keeps forwarding, as before the rules
            log.warning("relay ports: kernel forwarding not installed: %s", exc)
        finally:
            if done is not None:
                done()

    def _install(self, alloc: Allocation) -> None:
        self.forwarder.install(alloc)

    def _remove(self, alloc: Allocation) -> None:
        self.forwarder.remove(alloc)
        with self._lock:
            self._counters.pop(id(alloc), None)

    def _read(self, alloc: Allocation) -> None:
        try:
            got = self.forwarder.read_all()
        except (NftError, ValueError, KeyError) as exc:
            log.debug("relay ports: reading counters: %s", exc)
            return
        with self._lock:
            self._counters = got
