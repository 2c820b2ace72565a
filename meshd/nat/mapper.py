"""The port-map shell: NAT-PMP/PCP (:class:`meshd.nat.portmap.PortMapper`) and UPnP IGD in parallel.

All three are probed at once; the first to grant a mapping is kept and the others are left alone (or
their mapping deleted if it arrived too). The lease (default 2 h) is renewed at half-life; the mapping is
deleted on :meth:`close`. ``on_change(protocol, external)`` reports the current mapping (None, None when
there is none), which becomes a candidate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Callable

from meshd.nat import upnp
from meshd.nat.portmap import MapGranted, MapLost, PortMapper
from meshd.proto.endpoint import Endpoint

log = logging.getLogger("meshd.nat.portmap")
DEFAULT_LEASE = 7200


def default_gateway() -> tuple[str, str] | None:
    """(gateway, our source address towards it) of the IPv4 default route, or None."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for r in ipr.get_default_routes(family=2):
            gw = r.get_attr("RTA_GATEWAY")
            if not gw:
                continue
            src = r.get_attr("RTA_PREFSRC")
            if not src:
                got = ipr.route("get", dst=gw)
                src = got[0].get_attr("RTA_PREFSRC") if got else None
            if src:
                return str(gw), str(src)
    return None


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, on_data: Callable[[bytes, Endpoint], None]) -> None:
        self.on_data = on_data

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_data(data, (addr[0], addr[1]))


class PortMapShell:
    def __init__(
        self,
        port: int,
        tag: str,
        on_change: Callable[[str | None, Endpoint | None], None],
        *,
        lease: int = DEFAULT_LEASE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.port = port
        self.tag = tag
        self.lease = lease
        self.on_change = on_change
        self.clock = clock
        self.protocol: str | None = None
        self.external: Endpoint | None = None
        self._pm: PortMapper | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._upnp: upnp.UpnpMapping | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self.upnp_seen = False

    async def start(self) -> None:
        gw = await asyncio.to_thread(default_gateway)
        if gw is None:
            log.info("no IPv4 default gateway: no port maps")
            return
        gateway, src = gw
        # the same nonce after a restart: a PCP server refuses to renew our mapping with another one
        nonce = hashlib.sha256(f"meshd-pcp {self.tag} {self.port}".encode()).digest()[:12]
        self._pm = PortMapper(gateway, src, self.port, lifetime=self.lease, nonce=nonce)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            functools.partial(_Udp, self._received), local_addr=(src, 0)
        )
        self._udp = transport
        self._pm.start(self.clock())
        self._tasks = [
            asyncio.create_task(self._pm_loop(), name="portmap"),
            asyncio.create_task(self._upnp_loop(), name="upnp"),
        ]

    @property
    def spoken(self) -> list[str]:
        """The port-mapping protocols the gateway answered (for netcheck)."""
        out = set(self._pm.spoken) if self._pm is not None else set()
        if self.upnp_seen:
            out.add("upnp")
        return sorted(out)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._pm is not None and self._udp is not None:
            now = self.clock()
            self._pm.close(now)
            deadline = now + 1.0
            while not self._pm.closed and self.clock() < deadline:
                self._flush()
                self._pm.handle_timer(self.clock())
                await asyncio.sleep(0.05)
        if self._udp is not None:
            self._udp.close()
        if self._upnp is not None:
            with contextlib.suppress(upnp.UpnpError):
                await asyncio.to_thread(upnp.delete_mapping, self._upnp.external_port)
            self._upnp = None

    def _received(self, data: bytes, addr: Endpoint) -> None:
        if self._pm is not None:
            self._pm.receive(data, addr, self.clock())
            self._events()
            self._wake.set()

    def _flush(self) -> None:
        if self._pm is None or self._udp is None:
            return
        for data, dst in self._pm.datagrams_to_send(self.clock()):
            self._udp.sendto(data, dst)

    def _events(self) -> None:
        assert self._pm is not None
        while (ev := self._pm.next_event()) is not None:
            if isinstance(ev, MapGranted):
                if self.protocol == "upnp":
                    self._pm.close(self.clock())  # UPnP won the race: give this one back
                    continue
                self._set(ev.protocol, ev.external)
            elif isinstance(ev, MapLost) and self.protocol not in (None, "upnp"):
                log.info("port map lost: %s", ev.reason)
                self._set(None, None)

    def _set(self, protocol: str | None, external: Endpoint | None) -> None:
        if (protocol, external) != (self.protocol, self.external):
            self.protocol, self.external = protocol, external
            if external is not None:
                log.info("port map (%s): %s:%d -> udp/%d", protocol, external[0], external[1], self.port)
            self.on_change(protocol, external)

    async def _pm_loop(self) -> None:
        assert self._pm is not None
        while True:
            self._flush()
            self._pm.handle_timer(self.clock())
            self._events()
            self._flush()
            t = self._pm.next_timer()
            wait = 5.0 if t is None else max(0.0, t - self.clock())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(wait, 5.0))

    async def _upnp_loop(self) -> None:
        """Discover an IGD in parallel; map only if NAT-PMP/PCP have not already; renew at half-lease."""
        while True:
            try:
                await asyncio.to_thread(upnp.probe)  # maps nothing: tells netcheck the router speaks UPnP
                self.upnp_seen = True
            except upnp.UpnpError as e:
                log.debug("UPnP: %s", e)
                await asyncio.sleep(300)  # routers gain UPnP when reconfigured: ask again later
                continue
            if self.protocol not in (None, "upnp"):
                return  # NAT-PMP or PCP got there first
            try:
                m = await asyncio.to_thread(upnp.add_mapping, self.port, self.lease, self.tag)
            except upnp.UpnpError as e:
                log.debug("UPnP: %s", e)
                if self.protocol is None:
                    await asyncio.sleep(300)  # routers gain UPnP when reconfigured: ask again later
                    continue
                return
            if self.protocol not in (None, "upnp"):
                with contextlib.suppress(upnp.UpnpError):
                    await asyncio.to_thread(upnp.delete_mapping, m.external_port)
                return
            self._upnp = m
            if self._pm is not None:
                self._pm.close(self.clock())  # stop probing / give back anything it got
                self._wake.set()
            self._set("upnp", (m.external_ip, m.external_port))
            await asyncio.sleep(max(30.0, self.lease / 2))
