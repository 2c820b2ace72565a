"""The control session: the map stream held open, reconnected, and our candidates announced on it.

:meth:`ControlSession.run` holds the coordinator's map stream (WebSocket) with reconnect, backoff and
jitter. Every full map or delta goes to ``on_map``; call-me-maybe signals go to the path strategy.
While the coordinator is unreachable nothing is torn down: tunnels keep passing traffic.

Candidate announcements have one way in: the path strategy calls :meth:`announce` whenever our
candidates change, and every (re)connect sends the current list again. A closed stream alone does not
mean we were removed (the coordinator may be restarting): only when a signed request is refused too does
``on_revoked`` run.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from meshd.control import ControlClient, ControlError, MapRefused, MapStream
from meshd.proto import netmap
from meshd.wg.errors import WgError

log = logging.getLogger("meshd")

RECONNECT_MIN = 0.5
RECONNECT_MAX = 30.0
#: After the coordinator said it is restarting (close 1012) or busy (1013), every node hears the close at
#: once: the first reconnect comes at a uniformly random time within a window sized so that the mesh
#: (as large as the map we hold) arrives at about RECONNECT_RATE streams per second, at most
#: RESTART_SPREAD seconds (10,000 nodes: 14 s; 100 nodes: RECONNECT_MIN, as quick as before).
RECONNECT_RATE = 700.0
RESTART_SPREAD = 15.0
#: close codes after which reconnects are spread (RFC 6455: 1012 service restart, 1013 try again later)
SPREAD_AFTER = frozenset({netmap.CloseCode.RESTART, netmap.CloseCode.TOO_MANY_STREAMS})


#: after a restart close the coordinator is expected back soon: this many failed attempts back off to at
#: most RESTART_RETRY_MAX (not RECONNECT_MAX), so nodes are not still asleep for 30 s once it is up
RESTART_ATTEMPTS = 20
RESTART_RETRY_MAX = 3.0
#: several coordinator URLs (replicas, issue 16): after a failure the next URL is tried, waiting at most
#: this long, until every URL was tried once since the stream last worked; then the usual backoff. A
#: replica that dies is left within RECONNECT_MIN * 1.5 (its TCP connection is reset), well within 5 s.
FAILOVER_WAIT = 1.0


class Backoff:
    """When to try the map stream again (sans-IO: the caller sleeps what :meth:`next` returns)."""

    def __init__(self) -> None:
        self.delay = RECONNECT_MIN
        self.brisk = 0  #: attempts left that back off to RESTART_RETRY_MAX only

    def reset(self) -> None:
        """The stream worked: the first retry comes quickly."""
        self.delay, self.brisk = RECONNECT_MIN, 0

    def next(self, status: int | None, mesh_size: int) -> float:
        """Seconds to wait after an attempt that ended with close code / HTTP `status` (None: no answer;
        call :meth:`reset` first if the stream worked). After a restart or busy close the wait is
        uniform over a window sized by `mesh_size`; otherwise the delay doubles per failure, with +-50%
        jitter so that nodes that failed together drift apart instead of retrying in lockstep."""
        window = min(RESTART_SPREAD, max(RECONNECT_MIN, mesh_size / RECONNECT_RATE))
        if status in SPREAD_AFTER:
            self.delay, self.brisk = RECONNECT_MIN, RESTART_ATTEMPTS
            return random.uniform(0.0, window)
        if self.brisk > 0 and window > RESTART_RETRY_MAX:
            # a large mesh waiting for its coordinator: retries stay spread over the herd's window (about
            # RECONNECT_RATE attempts per second in all), not every node every 3 s once it is back
            self.brisk -= 1
            return random.uniform(RECONNECT_MIN, window)
        wait = self.delay * random.uniform(0.5, 1.5)
        cap = RESTART_RETRY_MAX if self.brisk > 0 else RECONNECT_MAX
        self.brisk = max(0, self.brisk - 1)
        self.delay = min(cap, self.delay * 2)
        return wait


class ControlSession:
    def __init__(
        self,
        client: ControlClient,
        *,
        on_map: Callable[[netmap.NetMap], Awaitable[None]],
        on_signal: Callable[[int, dict[str, Any]], None],
        on_revoked: Callable[[str], Awaitable[None]],
        candidates: Callable[[], list[str]],
        current_map: Callable[[], netmap.NetMap | None],
    ) -> None:
        self.client = client
        self.on_map = on_map
        self.on_signal = on_signal
        self.on_revoked = on_revoked
        self.candidates = candidates
        self.current_map = current_map
        self.announced: list[str] = []  #: what we last told the coordinator (shown by status)
        self.received_version: int | None = None  #: the newest map version the stream brought (metrics)
        self._stream: MapStream | None = None
        self._opened = False

    @property
    def connected(self) -> bool:
        return self._stream is not None

    async def announce(self, candidates: list[str]) -> None:
        """Our candidates changed (called by the path strategy): tell the coordinator now if connected."""
        self.announced = list(candidates)
        stream = self._stream
        if stream is None:
            return  # sent on the next connect
        try:
            await stream.send_endpoints(self.announced)
        except Exception as e:  # the stream loop notices a dead stream by itself
            log.debug("announcing candidates: %s", e)

    async def send_signal(self, node_id: int, payload: dict[str, Any]) -> None:
        stream = self._stream
        if stream is not None:
            await stream.send_signal(node_id, payload)

    async def run(self) -> None:
        """Hold the stream until cancelled or revoked."""
        backoff = Backoff()
        tried = 0  #: URLs tried since the stream last worked
        while True:
            self._opened = False
            status: int | None = None
            try:
                await self._hold()
            except ControlError as e:
                status = e.status
                if e.status in netmap.REFUSED and await self._revoked():
                    log.error("the coordinator no longer accepts this node: %s", e)
                    await self.on_revoked(str(e))
                    return
                # a refused map (bad signature, out of order) was not applied: the last good map stays,
                # and we resume from its version; refusals back off like failed connects
                if self._opened and not isinstance(e, MapRefused):
                    backoff.reset()
                log.warning("%s; retrying in %.1f s", e, backoff.delay)
            except WgError as e:  # applying a map failed: resuming from the last applied version retries it
                log.error("wireguard: %s", e)
            current = self.current_map()
            wait = backoff.next(status, len(current.peers) + 1 if current else 1)
            tried = 1 if self._opened else tried + 1
            if status not in netmap.REFUSED and tried < len(self.client.urls) and self.client.fail_over():
                wait = min(wait, FAILOVER_WAIT)  # another replica: no reason to wait for this one
                log.info("trying the coordinator at %s next", self.client.url)
            elif tried >= len(self.client.urls):
                tried = 0  # a full round failed: the usual backoff, then the next round
                self.client.fail_over()
            await asyncio.sleep(wait)

    async def _hold(self) -> None:
        current = self.current_map()
        since = current.version if current else None
        async with self.client.stream(since=since) as stream:
            stream.map = current
            self._stream = stream
            self._opened = True
            try:
                log.info("coordinator stream connected (since=%s)", since)
                await self.announce(self.candidates())
                while True:
                    msg = await stream.recv()
                    if isinstance(msg, netmap.MapMessage | netmap.DeltaMessage) and stream.map:
                        self.received_version = stream.map.version
                        await self.on_map(stream.map)
                    elif isinstance(msg, netmap.SignalMessage):
                        self.on_signal(msg.peer, msg.payload)
                    elif isinstance(msg, netmap.ErrorMessage):
                        log.warning("coordinator: %s", msg.message)
            finally:
                self._stream = None

    async def _revoked(self) -> bool:
        """Confirm with a signed request that the coordinator refuses us: True only on 401/403."""
        current = self.current_map()
        try:
            await self.client.fetch_map(since=current.version if current else None)
        except ControlError as e:
            return e.status in (401, 403)
        return False
