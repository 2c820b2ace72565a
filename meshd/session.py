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
        delay = RECONNECT_MIN
        while True:
            self._opened = False
            try:
                await self._hold()
            except ControlError as e:
                if e.status in netmap.REFUSED and await self._revoked():
                    log.error("the coordinator no longer accepts this node: %s", e)
                    await self.on_revoked(str(e))
                    return
                if self._opened and not isinstance(e, MapRefused):
                    delay = RECONNECT_MIN  # the stream worked: the first retry comes quickly
                # a refused map (bad signature, out of order) was not applied: the last good map stays,
                # and we resume from its version; refusals back off like failed connects
                log.warning("%s; retrying in %.1f s", e, delay)
            except WgError as e:  # applying a map failed: resuming from the last applied version retries it
                log.error("wireguard: %s", e)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(RECONNECT_MAX, delay * 2)

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
