"""meshd's relay client: a home region chosen by latency, on-demand links to peers' home regions, the
per-peer local proxies, tickets renewed over the open links, reconnect with backoff and jitter
(:mod:`meshd.relay.connect`).

``endpoint(wg_key)`` returns the peer's proxy address at once (the proxy socket is bound on demand, even
before any relay link is up: packets wait in a small per-region queue until the link connects), which is
what makes relay-first work: the traversal engine points WireGuard at it the moment the peer appears.

Every background task (one per region link, the keepalive/renewal loop, the home probe) runs under
:func:`meshd.supervise.supervise`: an unexpected error is logged with its traceback and the loop starts
again, so none dies silently. :meth:`RelayManager.close` stops them all at once; after it nothing
reconnects and every input is ignored. The decisions (home, routing, fail-over) are
:mod:`meshd.relay.home`; choosing home and failing over, :mod:`meshd.relay.homing`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from meshd.proto import peerrelay, relay
from meshd.proto.encoding import b64decode, b64encode
from meshd.proto.endpoint import Endpoint
from meshd.proto.netmap import RelayRegion
from meshd.relay import connect, homing
from meshd.relay import home as choose
from meshd.relay.connect import BACKOFF_MAX, BACKOFF_MIN
from meshd.relay.proxy import ProxyTable
from meshd.relay.region import RegionLink, RegionStatus
from meshd.relay.tickets import TicketCache, TicketSource
from meshd.relay.udpports import UdpPorts
from meshd.relay.waiting import Waiting
from meshd.supervise import supervise

log = logging.getLogger("meshd.relay")

KEEPALIVE = 10.0  #: ping every link this often...
DEAD_AFTER = 25.0  #: ...and call it dead when nothing came back for this long
CLOSE_WITHIN = 0.8  #: close() waits at most this long for its tasks to finish


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
        self.tickets = TicketCache(tickets, clock)
        self.on_state = on_state
        self.ssl_context = ssl_context
        self.regions: dict[int, RegionLink] = {}
        self.home: int | None = None
        self.proxies = ProxyTable(wg_port, self._send)
        #: UDP relay ports (issue 14); ``on_moved`` (WireGuard key, base64) is told when a relayed peer's
        #: endpoint changes between its UDP relay port and the TCP relay's proxy
        self.on_moved: Callable[[str], None] = lambda key: None
        self.udp = UdpPorts(wg_port, on_moved=lambda k: self.on_moved(b64encode(k)))
        self.peer_home: dict[bytes, int | None] = {}  #: from the map
        self._relayed: set[bytes] = set()  #: peers the path machines put on the relay
        #: peers WireGuard has (:meth:`configured`; None until told: then every map peer counts), and
        #: the handshake messages of senders it does not have yet (meshd.relay.waiting)
        self._wg_peers: set[bytes] | None = None
        self.waiting = Waiting()
        self.dropped = 0
        self.reconnects: dict[int, int] = {}  #: region id -> links made again after one was lost (metrics)
        self._up = False
        self.closed = False  #: close() was called: nothing reconnects, every input is ignored
        self._tasks: set[asyncio.Task[None]] = set()  #: every live task, for close()
        self._probe: asyncio.Task[None] | None = None
        self.home_down_since: float | None = None  #: the home link went down then (fail-over)

    # -- inputs --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn("relay-maintain", self._maintain)
        self._spawn("relay-udp-ports", self.udp.run)

    def set_regions(self, regions: Iterable[RelayRegion]) -> None:
        """The relay map changed: start links for new regions, stop removed ones, (re)choose home."""
        if self.closed:
            return
        new: dict[int, RelayRegion] = {}
        for r in regions:
            # the map decoder refuses bad regions already; this keeps one that slipped through (a hand-
            # made map in a test, an older decoder) from breaking the others: it is skipped and logged
            problem = relay.region_problem(r.id, r.name, r.url, r.stun_port)
            if problem is not None:
                log.warning("relay map: ignoring region %d: %s", r.id, problem)
                continue
            new[r.id] = r
        for rid in [i for i in self.regions if i not in new]:
            self._stop_region(rid)
        for rid, r in new.items():
            cur = self.regions.get(rid)
            if cur is None or cur.region != r:
                self._stop_region(rid)
                self.regions[rid] = RegionLink(r)
        if self.home not in self.regions:
            self.home = None
        if self.home is None and len(self.regions) == 1:
            self.home = next(iter(self.regions))
        elif self.home is None and self.regions:
            self.start_probe()
        self.reconcile_links()

    def set_peers(self, peers: Iterable[tuple[str, int | None]]) -> None:
        """(WireGuard key base64, relay_home) of every peer; proxies of peers that left are closed."""
        if self.closed:
            return
        homes = {b64decode(k, length=32): h for k, h in peers}
        self.proxies.keep_only(homes)
        self.udp.forget_others(set(homes))
        self._relayed &= set(homes)
        self.peer_home = homes
        self.reconcile_links()

    def rekey(self, wg_key: bytes) -> None:
        """Our WireGuard key was rotated: the relay addresses us by it, so every link reconnects under the
        new key with a fresh ticket (the coordinator issues tickets for the key it has registered)."""
        self.wg_key = wg_key
        self.tickets.forget()  # every region's: tickets name the WireGuard key
        for r in self.regions.values():
            if r.link is not None:
                r.link.close("wireguard key rotated")

    def endpoint(self, wg_key: str) -> Endpoint | None:
        """Where WireGuard should send this peer's packets while it is relayed: the UDP relay port once
        both sides are bound, else the 127.0.0.1 proxy of the TCP relay."""
        if self.closed:
            return None
        key = b64decode(wg_key, length=32)
        return self.udp.endpoint(key) or self.proxies.open(key).address

    def use(self, wg_key: str, relayed: bool) -> None:
        """The path machines put this peer on the relay (or took it off): ask for (or stop binding) its
        UDP relay port."""
        if self.closed:
            return
        key = b64decode(wg_key, length=32)
        if relayed:
            self._relayed.add(key)
        else:
            self._relayed.discard(key)
        self.udp.want(key, self._pair_region(key), relayed)

    def peer_relay(self, body: peerrelay.Use | peerrelay.Drop) -> None:
        """The coordinator offered (``use``) or withdrew (``drop``) a peer relay for a peer (issue 14): a
        relayed peer moves to it (or back to its region's ports) at once."""
        if self.closed:
            return
        if isinstance(body, peerrelay.Use):
            self.udp.offer(body)
        else:
            self.udp.withdraw(body.peer)
        if body.peer in self._relayed:
            self.udp.want(body.peer, self._pair_region(body.peer), True)

    def is_relay_address(self, wg_key: str, endpoint: Endpoint | None) -> bool:
        """``endpoint`` is one of the peer's relay addresses (its TCP relay proxy or a UDP relay port it
        has had: WireGuard may roam onto one after we stopped using it)."""
        if endpoint is None or self.closed:
            return False
        key = b64decode(wg_key, length=32)
        proxy = self.proxies.get(key)
        return (proxy is not None and endpoint == proxy.address) or self.udp.was_endpoint(key, endpoint)

    def transport(self, wg_key: str) -> str:
        """How a relayed peer's packets go: ``udp`` (UDP relay ports) or ``tcp`` (the relay session)."""
        key = b64decode(wg_key, length=32)
        if self.udp.via_peer(key) is not None:
            return "peer"
        return "udp" if self.udp.endpoint(key) is not None else "tcp"

    def relay_name(self, wg_key: str, relay_home: int | None) -> str | None:
        """What status calls a relayed peer's relay: the peer relay node, else the region."""
        use = self.udp.via_peer(b64decode(wg_key, length=32))
        return use.name if use is not None else self.region_name(relay_home)

    def _pair_region(self, peer: bytes) -> int | None:
        """The region of a pair's UDP relay ports: the home region of the side with the lower key, or
        ``-node id`` of the peer relay the coordinator offered (issue 14)."""
        use = self.udp.offered(peer)
        if use is not None:
            return -use.relay
        return self.home if self.wg_key < peer else (self.peer_home.get(peer) or self.home)

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        r = self.regions.get(self.home) if self.home is not None else None
        return bool(r and r.open_link)

    def home_name(self) -> str | None:
        r = self.regions.get(self.home) if self.home is not None else None
        return r.region.name if r else None

    def home_rtt_ms(self) -> float | None:
        """The last measured round trip to the home region's relay, in ms (path reports' facts)."""
        r = self.regions.get(self.home) if self.home is not None else None
        return r.rtt * 1000 if r is not None and r.rtt is not None else None

    def region_name(self, region_id: int | None) -> str | None:
        r = self.regions.get(region_id) if region_id is not None else None
        return r.region.name if r else self.home_name()

    async def measure(self) -> None:
        """Ping every connected region now (netcheck): fresh round-trip times in :meth:`status`."""
        for r in list(self.regions.values()):
            await r.measure()

    def status(self) -> list[RegionStatus]:
        return [r.status(rid, rid == self.home) for rid, r in sorted(self.regions.items())]

    async def close(self) -> None:
        """Stop every task, link and proxy now (within CLOSE_WITHIN s); nothing reconnects afterwards."""
        self.closed = True
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        for rid in list(self.regions):
            self._stop_region(rid)
        self.proxies.close()
        self.udp.close()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=CLOSE_WITHIN)
            for t in late:
                log.warning("relay task %s did not stop within %.1f s", t.get_name(), CLOSE_WITHIN)

    # -- data path -----------------------------------------------------------------------------------------
    def _send(self, dst: bytes, packet: bytes) -> None:
        rid = choose.route(self.peer_home.get(dst), self.home, self.regions, self._is_open)
        r = self.regions.get(rid) if rid is not None else None
        if r is None or not r.send(dst, packet):
            self.dropped += 1

    def received(self, src: bytes, packet: bytes | memoryview) -> None:
        if self.closed:
            return
        if self._wg_peers is None:
            if src in self.proxies or src in self.peer_home:
                self.proxies.deliver(src, packet)
        elif src in self._wg_peers:
            self.proxies.deliver(src, packet)
        else:  # a peer's first initiation may come before our WireGuard has the peer: it waits
            self.waiting.hold(src, packet, time.monotonic())

    def configured(self, wg_keys: Iterable[str]) -> None:
        """WireGuard has exactly these peers now (MapApplier, after each reconcile): their relayed
        packets go to it, and what the ones just added sent meanwhile is delivered now."""
        if self.closed:
            return
        self._wg_peers = {b64decode(k, length=32) for k in wg_keys}
        if not self.waiting:
            return
        now = time.monotonic()
        for key in self._wg_peers:
            held = self.waiting.take(key, now)
            for packet in held:
                self.proxies.deliver(key, packet)
            if held:
                log.debug("relay: %d packet(s) from %s waited for WireGuard", len(held), key.hex()[:8])

    def _is_open(self, rid: int) -> bool:
        return self.regions[rid].open_link is not None  # route() asks only about known regions

    # -- tasks ---------------------------------------------------------------------------------------------
    def _spawn(
        self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]
    ) -> asyncio.Task[None] | None:
        """Start a supervised task (restarted with backoff and a logged traceback if it raises)."""
        if self.closed:
            return None
        task = asyncio.create_task(
            supervise(name, factory, backoff_min=BACKOFF_MIN, backoff_max=BACKOFF_MAX), name=name
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def choosing(self) -> bool:
        """The home region is being chosen (links to every region are measured)."""
        return self._probe is not None and not self._probe.done()

    def start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = self._spawn("relay-probe", functools.partial(homing.choose_home, self))

    def reconcile_links(self) -> None:
        want = choose.wanted(self.home, self.regions, self.peer_home.values())
        for rid, r in self.regions.items():
            if rid in want and (r.task is None or r.task.done()):
                run = functools.partial(connect.run_region, self, rid, r)
                r.task = self._spawn(f"relay-{r.region.name}", run)
            elif rid not in want and r.task is not None:
                self._stop_region(rid, keep=True)

    def _stop_region(self, rid: int, keep: bool = False) -> None:
        r = self.regions.get(rid) if keep else self.regions.pop(rid, None)
        if r is not None:
            r.stop("region no longer needed")

    def set_up(self, up: bool) -> None:
        if up != self._up and not self.closed:
            self._up = up
            try:
                self.on_state(up)
            except Exception:  # the callback's bug must not take the relay link down with it
                log.exception("relay state callback failed")

    async def _maintain(self) -> None:
        """Keepalive pings, dead-link detection, and ticket renewal over the open links."""
        while True:
            await asyncio.sleep(KEEPALIVE / 2)
            for r in list(self.regions.values()):
                await r.keepalive(DEAD_AFTER)
            await self._renew()

    async def _renew(self) -> None:
        """A fresh ticket over each open link whose ticket is due (each region has its own)."""
        for rid, r in list(self.regions.items()):
            if r.open_link is None or not self.tickets.due(rid):
                continue
            try:
                grant = await self.tickets.get(rid)
            except Exception as exc:  # coordinator unreachable: the next round tries again
                log.warning("relay ticket renewal for %s failed: %s", r.name, exc)
                return
            if (link := r.open_link) is not None:
                link.renew(self.wg_key, grant.ticket.encode("ascii"), home=rid == self.home)
