"""One relay region as the relay client sees it: its link (when up), the task that keeps it up, the
packets waiting for it, and what netcheck shows of it. :class:`meshd.relay.manager.RelayManager` owns
one per region and runs the connect loop; this holds the per-region state and the link's life.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass

from meshd.proto import relay
from meshd.proto.netmap import RelayRegion
from meshd.relay import link as rlink

log = logging.getLogger("meshd.relay")

#: packets held per region while its link connects (then the oldest is dropped); with packets capped at
#: relay.MAX_PACKET this holds 64 x 1.5 KiB = 96 KiB per region at most. Once the link is up, its own
#: bounds apply (relay.WRITE_HIGH on the Upgrade transport, relay.QUEUE_BYTES on the WebSocket).
PENDING = 64


@dataclass(frozen=True, slots=True)
class RegionStatus:
    id: int
    name: str
    connected: bool
    home: bool
    rtt_ms: float | None
    transport: str | None
    error: str | None


class RegionLink:
    def __init__(self, region: RelayRegion) -> None:
        self.region = region
        self.link: rlink.RelayLink | None = None
        self.task: asyncio.Task[None] | None = None  #: the supervised connect loop, while wanted
        #: (dst key, packet) waiting for the link: PENDING at most, the oldest is dropped beyond
        self.pending: collections.deque[tuple[bytes, bytes]] = collections.deque(maxlen=PENDING)
        self.rtt: float | None = None
        self.error: str | None = None

    @property
    def name(self) -> str:
        return self.region.name

    @property
    def open_link(self) -> rlink.RelayLink | None:
        return self.link if self.link is not None and self.link.is_open else None

    def send(self, dst: bytes, packet: bytes) -> bool:
        """Send now, or hold the packet until the link is up; False when that dropped an older one (or
        this one: a packet over relay.MAX_PACKET, which the relay would refuse, is never held)."""
        if len(packet) > relay.MAX_PACKET:
            return False
        link = self.open_link
        if link is not None:
            link.send_packet(dst, packet)
            return True
        full = len(self.pending) == PENDING
        self.pending.append((dst, packet))
        return not full

    async def measure(self, tries: int = 1, within: float = 1.0) -> float | None:
        """The best of ``tries`` PING round trips (seconds), or None when the link is down or silent."""
        link = self.open_link
        if link is None:
            return None
        with contextlib.suppress(rlink.RelayLinkError):
            self.rtt = min([await link.ping(within) for _ in range(tries)])
            return self.rtt
        return None

    async def keepalive(self, dead_after: float) -> None:
        """Ping the link (the relay's answers keep it alive); close it when the relay has been silent for
        ``dead_after`` seconds, so the connect loop starts over."""
        link = self.open_link
        if link is not None and link.idle > dead_after:
            link.close("no traffic from the relay")
        elif link is not None:
            await self.measure(within=2.0)

    def attach(self, link: rlink.RelayLink) -> None:
        """Make ``link`` this region's link and send what waited for it."""
        self.link, self.error = link, None
        log.info("relay %s connected (%s)", self.name, link.transport)
        while self.pending:
            link.send_packet(*self.pending.popleft())

    async def wait_closed(self, link: rlink.RelayLink) -> str:
        """Why ``link`` closed, once it has. If the task is cancelled meanwhile the link goes with it."""
        try:
            reason = await link.closed
        finally:
            if link.is_open:
                link.close("relay client stopped")
            if self.link is link:
                self.link = None
        self.error = reason
        log.warning("relay %s disconnected: %s", self.name, reason)
        return reason

    def stop(self, reason: str) -> None:
        """Cancel the connect loop and close the link."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.link is not None:
            self.link.close(reason)
            self.link = None

    def status(self, rid: int, home: bool) -> RegionStatus:
        link = self.open_link
        rtt = round(self.rtt * 1000, 3) if self.rtt is not None else None
        transport = link.transport if link is not None else None
        return RegionStatus(rid, self.name, link is not None, home, rtt, transport, self.error)
