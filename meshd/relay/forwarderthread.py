"""The kernel fast path's installs (``nft``/``conntrack``) run on a thread of their own, off the event loop.

Installing one pair's forwarding is a dozen short processes (the table, six rules, the old flows of both
ports: ``conntrack -D`` alone is ~14 ms each): 50-150 ms during which a relay's event loop did nothing
else. In the coordinator that loop also carries the TCP relay, the map streams and enrollment, so every
packet relayed then waited: the benchmark's first ping through a fresh pair came ~90 ms late (issue 15),
and a hundred pairs bound at once would have stalled the coordinator for seconds. The port server holds
the pair's "bound" state back until the rules are in (meshd.relay.portserver), so the nodes go on over
the TCP relay meanwhile and no packet is forwarded in userspace while the kernel takes over.

One worker, so installs and counter reads happen in the order they were asked for; ``counters`` answers
from the last read and asks for a new one at most every ``COUNTER_EVERY`` s. A removal is not queued: it
runs at once on the caller's thread (waiting for the worker's current step, if any), as it always did. A
removed node's traffic must stop now, and only the removal's conntrack delete stops it: established flows
keep their NAT without any rule. An install still queued for that pair is dropped. ``close`` waits for what
is queued (the table goes after the last rule), bounded by the processes' own timeouts.
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
    """A :class:`~meshd.relay.portserver.KernelForwarder` that hands installs to one worker thread."""

    def __init__(self, forwarder: NftForwarder, *, counter_every: float = COUNTER_EVERY) -> None:
        self.forwarder = forwarder
        self.counter_every = counter_every
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-nft")
        self._nft = threading.Lock()  #: held through every step of the forwarder (nft, conntrack, its state)
        self._lock = threading.Lock()  #: guards the fields below
        self._counters: dict[int, tuple[int, int, int, int]] = {}  #: id(alloc) -> last read
        self._queued: dict[int, int] = {}  #: id(alloc) -> installs queued and not begun
        self._dropped: set[int] = set()  #: id(alloc) of removed pairs whose queued installs must not run
        self._read_at = 0.0
        self._reading: Future[None] | None = None
        self._closed = False

    def install(self, alloc: Allocation, done: Callable[[], None]) -> None:
        """Install ``alloc``'s forwarding; ``done()`` follows on the worker thread, also when nft refused
        (the pair then stays in userspace), when the pair was removed first, or when closed before."""
        if self._closed:
            done()
            return
        with self._lock:
            self._queued[id(alloc)] = self._queued.get(id(alloc), 0) + 1
        self._pool.submit(self._guarded, self._install, alloc, done)

    def remove(self, alloc: Allocation) -> None:
        """Remove ``alloc``'s forwarding now (module docstring); errors are logged."""
        with self._nft:
            with self._lock:
                if self._queued.get(id(alloc)):
                    self._dropped.add(id(alloc))
                self._counters.pop(id(alloc), None)
            try:
                self.forwarder.remove(alloc)
            except Exception as exc:  # logged; the table goes at close whatever happens
                log.warning("relay ports: removing kernel forwarding: %s", exc)

    def counters(self, alloc: Allocation) -> tuple[int, int, int, int] | None:
        now = time.monotonic()
        reading = self._reading
        if (
            not self._closed
            and now - self._read_at >= self.counter_every
            and (reading is None or reading.done())
        ):
            self._read_at = now
            self._reading = self._pool.submit(self._guarded, self._read, alloc, None)
        with self._lock:
            return self._counters.get(id(alloc))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        with self._nft:
            self.forwarder.close()

    def drain(self) -> None:
        """Until everything asked so far was done (tests)."""
        if not self._closed:
            self._pool.submit(lambda: None).result()

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
        with self._nft:  # a removal either comes before (and drops this) or after (and undoes it)
            with self._lock:
                left = self._queued.pop(id(alloc), 1) - 1
                if left:
                    self._queued[id(alloc)] = left
                dropped = id(alloc) in self._dropped
                if not left:
                    self._dropped.discard(id(alloc))
            if not dropped:
                self.forwarder.install(alloc)

    def _read(self, alloc: Allocation) -> None:
        with self._nft:  # no removal between the read and its use
            try:
                got = self.forwarder.read_all()
            except (NftError, ValueError, KeyError) as exc:
                log.debug("relay ports: reading counters: %s", exc)
                return
            with self._lock:
                self._counters = got
