"""meshd's relay client: a home region chosen by latency, on-demand links to peers' home regions, the
per-peer local proxies, tickets renewed over the open links, reconnect with backoff and jitter.

``endpoint(wg_key)`` returns the peer's proxy address at once (the proxy socket is bound on demand, even
before any relay link is up: packets wait in a small per-region queue until the link connects), which is
what makes relay-first work: the traversal engine points WireGuard at it the moment the peer appears.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from meshd.proto.encoding import b64decode
from meshd.proto.netmap import RelayRegion
from meshd.relay import link as rlink
from meshd.relay.proxy import PeerProxy, open_proxy

log = logging.getLogger("meshd.relay")

BACKOFF_MIN = 0.2
BACKOFF_MAX = 3.0
HOME_FAILOVER = 3.0  #: seconds the home region may be unreachable before another is chosen
KEEPALIVE = 10.0  #: ping every link this often...
DEAD_AFTER = 25.0  #: ...and call it dead when nothing came back for this long
PENDING = 64

TicketSource = Callable[[], Awaitable[tuple[str, float]]]  #: -> (ticket, not_after unix seconds)


@dataclass(frozen=True, slots=True)
class RegionStatus:
    id: int
    name: str
    connected: bool
    home: bool
    rtt_ms: float | None
    transport: str | None
    error: str | None


class _Region:
    def __init__(self, region: RelayRegion) -> None:
        self.region = region
        self.link: rlink.RelayLink | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending: collections.deque[tuple[bytes, bytes]] = collections.deque(maxlen=PENDING)
        self.rtt: float | None = None
        self.error: str | None = None
        self.wanted = True


class RelayManager:
    def __init__(
        self,
        *,
        wg_key: bytes,
        wg_port: int,
        tickets: TicketSource,
        on_state: Callable[[bool], None] = lambda up: None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.wg_key = wg_key
        self.wg_port = wg_port
        self.tickets = tickets
        self.on_state = on_state
        self.ssl_context = ssl_context
        self.clock = clock
        self.regions: dict[int, _Region] = {}
        self.home: int | None = None
        self.proxies: dict[bytes, PeerProxy] = {}
        self.peer_home: dict[bytes, int | None] = {}
        self.dropped = 0
        self._ticket: tuple[bytes, float] | None = None
        self._ticket_lock = asyncio.Lock()
        self._up = False
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._probe: asyncio.Task[None] | None = None
        self._home_down_since: float | None = None

    # -- inputs --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._maintain(), name="relay-maintain"))

    def set_regions(self, regions: Iterable[RelayRegion]) -> None:
        """The relay map changed: start links for new regions, stop removed ones, (re)choose home."""
        new = {r.id: r for r in regions}
        for rid in [i for i in self.regions if i not in new]:
            self._stop_region(rid)
        for rid, r in new.items():
            cur = self.regions.get(rid)
            if cur is not None and cur.region == r:
                continue
            if cur is not None:
                self._stop_region(rid)
            self.regions[rid] = _Region(r)
        if self.home not in self.regions:
            self.home = None
        if self.home is None and self.regions:
            if len(self.regions) == 1:
                self.home = next(iter(self.regions))
            elif self._probe is None or self._probe.done():
                self._probe = asyncio.create_task(self._choose_home(), name="relay-probe")
        self._reconcile_links()

    def set_peers(self, peers: Iterable[tuple[str, int | None]]) -> None:
        """(WireGuard key base64, relay_home) of every peer; proxies of peers that left are closed."""
        homes = {b64decode(k, length=32): h for k, h in peers}
        for key in [k for k in self.proxies if k not in homes]:
            self.proxies.pop(key).close()
        self.peer_home = homes
        self._reconcile_links()

    def rekey(self, wg_key: bytes) -> None:
        """Our WireGuard key was rotated: the relay addresses us by it, so every link reconnects under the
        new key with a fresh ticket (the coordinator issues tickets for the key it has registered)."""
        self.wg_key = wg_key
        self._ticket = None
        for r in self.regions.values():
            if r.link is not None:
                r.link.close("wireguard key rotated")

    def endpoint(self, wg_key: str) -> tuple[str, int] | None:
        """The 127.0.0.1 address WireGuard should use for this peer while it is relayed."""
        if self._closed:
            return None
        key = b64decode(wg_key, length=32)
        proxy = self.proxies.get(key)
        if proxy is None:
            proxy = open_proxy(key, self.wg_port, self._send)
            self.proxies[key] = proxy
        return proxy.address

    @property
    def up(self) -> bool:
        r = self.regions.get(self.home) if self.home is not None else None
        return bool(r and r.link and r.link.is_open)

    def home_name(self) -> str | None:
        r = self.regions.get(self.home) if self.home is not None else None
        return r.region.name if r else None

    def region_name(self, region_id: int | None) -> str | None:
        r = self.regions.get(region_id) if region_id is not None else None
        return r.region.name if r else self.home_name()

    async def measure(self) -> None:
        """Ping every connected region now (netcheck): fresh round-trip times in :meth:`status`."""
        for r in list(self.regions.values()):
            if r.link is not None and r.link.is_open:
                with contextlib.suppress(rlink.RelayLinkError):
                    r.rtt = await r.link.ping(1.0)

    def status(self) -> list[RegionStatus]:
        return [
            RegionStatus(
                rid,
                r.region.name,
                bool(r.link and r.link.is_open),
                rid == self.home,
                round(r.rtt * 1000, 3) if r.rtt is not None else None,
                r.link.transport if r.link and r.link.is_open else None,
                r.error,
            )
            for rid, r in sorted(self.regions.items())
        ]

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks + ([self._probe] if self._probe else []):
            t.cancel()
        for rid in list(self.regions):
            self._stop_region(rid)
        for p in self.proxies.values():
            p.close()
        self.proxies.clear()

    # -- data path -----------------------------------------------------------------------------------------
    def _send(self, dst: bytes, packet: bytes) -> None:
        rid = self.peer_home.get(dst) or self.home
        r = self.regions.get(rid) if rid is not None else None
        if r is None or ((r.link is None or not r.link.is_open) and rid != self.home):
            r = self.regions.get(self.home) if self.home is not None else None  # their region is down
        if r is None:
            self.dropped += 1
            return
        link = r.link
        if link is not None and link.is_open:
            link.send_packet(dst, packet)
        else:
            if len(r.pending) == PENDING:
                self.dropped += 1
            r.pending.append((dst, packet))

    def _received(self, src: bytes, packet: bytes) -> None:
        proxy = self.proxies.get(src)
        if proxy is None and src in self.peer_home:
            proxy = open_proxy(src, self.wg_port, self._send)
            self.proxies[src] = proxy
        if proxy is not None:
            proxy.deliver(packet)

    # -- links ---------------------------------------------------------------------------------------------
    def _wanted(self) -> set[int]:
        want = {self.home} if self.home is not None else set()
        if self.home is None:
            want |= set(self.regions)  # while choosing, every region is probed
        want |= {h for h in self.peer_home.values() if h is not None and h in self.regions}
        return want

    def _reconcile_links(self) -> None:
        if self._closed:
            return
        want = self._wanted()
        for rid, r in self.regions.items():
            if rid in want and (r.task is None or r.task.done()):
                r.task = asyncio.create_task(self._run_region(rid, r), name=f"relay-{r.region.name}")
            elif (
                rid not in want and r.task is not None and not any(h == rid for h in self.peer_home.values())
            ):
                self._stop_region(rid, keep=True)

    def _stop_region(self, rid: int, keep: bool = False) -> None:
        r = self.regions.get(rid) if keep else self.regions.pop(rid, None)
        if r is None:
            return
        if r.task is not None:
            r.task.cancel()
            r.task = None
        if r.link is not None:
            r.link.close("region no longer needed")
            r.link = None

    async def _ticket_bytes(self) -> bytes:
        async with self._ticket_lock:
            now = self.clock()
            if self._ticket is None or now > self._ticket[1] - 100:
                text, not_after = await self.tickets()
                self._ticket = (text.encode("ascii"), not_after)
            return self._ticket[0]

    async def _run_region(self, rid: int, r: _Region) -> None:
        delay = BACKOFF_MIN
        while not self._closed:
            try:
                ticket = await self._ticket_bytes()
                link = await rlink.connect(
                    r.region.url,
                    self.wg_key,
                    ticket,
                    home=rid == self.home,
                    on_packet=self._received,
                    ssl_context=self.ssl_context,
                )
            except Exception as exc:  # network trouble, refused ticket, coordinator down
                r.error = str(exc)
                log.warning("relay %s: %s; retrying in %.1f s", r.region.name, exc, delay)
                if rid == self.home:
                    self._home_down_since = self._home_down_since or time.monotonic()
                    if self._maybe_fail_over():
                        return
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(BACKOFF_MAX, delay * 2)
                continue
            delay = BACKOFF_MIN
            r.link, r.error = link, None
            if rid == self.home:
                self._home_down_since = None
            log.info("relay %s connected (%s)", r.region.name, link.transport)
            while r.pending:
                dst, pkt = r.pending.popleft()
                link.send_packet(dst, pkt)
            if rid == self.home:
                self._set_up(True)
            reason = await link.closed
            r.link = None
            r.error = reason
            log.warning("relay %s disconnected: %s", r.region.name, reason)
            if rid == self.home:
                self._set_up(False)
                self._home_down_since = time.monotonic()
            if "ticket" in reason or "removed" in reason:
                self._ticket = None

    def _maybe_fail_over(self) -> bool:
        """The home region has been unreachable for HOME_FAILOVER seconds and there are others: choose the
        home again among those that answer (the old one is probed too and wins back if it returns)."""
        since = self._home_down_since
        if since is None or time.monotonic() - since < HOME_FAILOVER or len(self.regions) < 2:
            return False
        if self._probe is not None and not self._probe.done():
            return False
        log.warning("relay home region unreachable for %.0f s: choosing another", time.monotonic() - since)
        self.home = None
        self._home_down_since = None
        self._probe = asyncio.create_task(self._choose_home(), name="relay-probe")
        return True

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            with contextlib.suppress(Exception):
                self.on_state(up)

    async def _choose_home(self) -> None:
        """Connect to every region, measure relay PING round trips, make the fastest the home region."""
        self._reconcile_links()
        deadline = time.monotonic() + 5.0
        best: tuple[float, int] | None = None
        while time.monotonic() < deadline and best is None:
            await asyncio.sleep(0.05)
            results = []
            for rid, r in list(self.regions.items()):
                if r.link is not None and r.link.is_open:
                    try:
                        rtts = [await r.link.ping(1.0) for _ in range(3)]
                    except rlink.RelayLinkError:
                        continue
                    r.rtt = min(rtts)
                    results.append((r.rtt, rid))
            if results and (len(results) == len(self.regions) or time.monotonic() > deadline - 3.0):
                best = min(results)
        if best is None:
            best = (0.0, min(self.regions)) if self.regions else None
        if best is None:
            return
        self.home = best[1]
        r = self.regions[self.home]
        log.info("relay home region: %s (%.1f ms)", r.region.name, best[0] * 1000)
        if r.link is not None and r.link.is_open:
            r.link.renew(self.wg_key, await self._ticket_bytes(), home=True)
            self._set_up(True)
        self._reconcile_links()

    async def _maintain(self) -> None:
        """Keepalive pings, dead-link detection, and ticket renewal over the open links."""
        while True:
            await asyncio.sleep(KEEPALIVE / 2)
            for r in list(self.regions.values()):
                link = r.link
                if link is None or not link.is_open:
                    continue
                if link.idle > DEAD_AFTER:
                    link.close("no traffic from the relay")
                    continue
                with contextlib.suppress(rlink.RelayLinkError):
                    r.rtt = await link.ping(2.0)
            if self._ticket is not None and self.clock() > self._ticket[1] - 100:
                try:
                    ticket = await self._ticket_bytes()
                except Exception as exc:
                    log.warning("relay ticket renewal failed: %s", exc)
                    continue
                for rid, r in self.regions.items():
                    if r.link is not None and r.link.is_open:
                        r.link.renew(self.wg_key, ticket, home=rid == self.home)
