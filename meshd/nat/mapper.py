"""The port-map shell: NAT-PMP/PCP (:class:`meshd.nat.portmap.PortMapper`) and UPnP IGD in parallel.

All three are probed at once; the first to grant a mapping is kept and the others are left alone (or
their mapping deleted if it arrived too). The lease (default 2 h) is renewed at half-life; the mapping is
deleted on :meth:`close`. ``on_change(protocol, external)`` reports the current mapping (None, None when
there is none), which becomes a candidate.

Stopping is bounded: :meth:`PortMapShell.close` returns within ``within`` seconds (default
``CLOSE_TIMEOUT``), whatever the router does. miniupnpc blocks (discovery, SOAP over HTTP), so every UPnP
call runs in a daemon thread of its own with a deadline (:func:`blocking`): not in asyncio's default
executor, which ``asyncio.run`` and the interpreter wait for at exit without any timeout. A UPnP mapping
still being made when we close is waited for (within the deadline) and deleted; the NAT-PMP/PCP request in
flight is answered with a delete (lifetime 0) even before it was granted. The loops run supervised
(meshd.supervise): an unexpected error is logged with its traceback and the loop starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from meshd.nat import upnp
from meshd.nat.portmap import MapGranted, MapLost, PortMapper
from meshd.proto.endpoint import Endpoint
from meshd.supervise import TaskGroup

log = logging.getLogger("meshd.nat.portmap")
DEFAULT_LEASE = 7200
CLOSE_TIMEOUT = 1.8  #: seconds close() may take at most, deleting maps included (the daemon allows 2)
UPNP_CALL_TIMEOUT = 10.0  #: seconds for one blocking UPnP step (discovery, add with stale clean-up)
UPNP_RETRY = 300.0  #: routers gain UPnP when reconfigured: ask again after this long

T = TypeVar("T")


def start_blocking(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``fn()`` in a new daemon thread; its result (or exception) arrives in the returned future.

    A daemon thread, not the default executor: a call stuck on an unreachable router must never keep the
    process from exiting. Cancelling the future does not stop the thread (nothing can), it only stops
    waiting; the result is then dropped.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            fut.set_exception(value)

    def run() -> None:
        try:
            result: object = fn()
            ok = True
        except Exception as e:
            result, ok = e, False
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


async def blocking(fn: Callable[[], T], *, within: float, name: str = "upnp") -> T:
    """``fn()`` in a daemon thread; TimeoutError after ``within`` s (the thread is then abandoned)."""
    async with asyncio.timeout(within):
        return await start_blocking(fn, name)


async def wait_set(event: asyncio.Event, within: float) -> None:
    """Until ``event`` is set or ``within`` s passed.

    Never ``asyncio.wait_for(event.wait(), t)`` here: on Python 3.11 it swallows a cancellation that
    arrives together with the event (a datagram landing as the daemon stops), and the loop then runs on
    after it was cancelled: the stop hung (issue 11). ``asyncio.timeout`` keeps the cancellation.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            await event.wait()


def default_gateway() -> tuple[str, str] | None:
    """(gateway, our source address towards it) of the IPv4 default route, or None."""
    from pyroute2.iproute.linux import IPRoute

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

    def datagram_received(self, data: bytes, addr: Endpoint) -> None:
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
        self._igd: upnp.Igd | None = None
        self._upnp: upnp.UpnpMapping | None = None
        self._upnp_adding: asyncio.Future[upnp.UpnpMapping] | None = None  #: an add in flight
        self._tasks = TaskGroup()
        self._wake = asyncio.Event()
        self._closed = False
        self.upnp_seen = False
        self.gateway: str | None = None  #: the IPv4 default gateway (UPnP searches it directly too)
        self._upnp_expires: float | None = None  #: when the UPnP lease ends (self.clock)

    async def start(self) -> None:
        gw = await blocking(default_gateway, within=5.0, name="default-gateway")
        if gw is None:
            log.info("no IPv4 default gateway: no port maps")
            return
        if self._closed:
            return
        gateway, src = gw
        self.gateway = gateway
        # the same nonce after a restart: a PCP server refuses to renew our mapping with another one
        nonce = hashlib.sha256(f"meshd-pcp {self.tag} {self.port}".encode()).digest()[:12]
        self._pm = PortMapper(gateway, src, self.port, lifetime=self.lease, nonce=nonce)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            functools.partial(_Udp, self._received), local_addr=(src, 0)
        )
        self._udp = transport
        if self._closed:  # closed while we were binding
            transport.close()
            return
        self._pm.start(self.clock())
        self._tasks.start("portmap", self._pm_loop)
        self._tasks.start("upnp", self._upnp_loop)

    @property
    def spoken(self) -> list[str]:
        """The port-mapping protocols the gateway answered (for netcheck)."""
        out = set(self._pm.spoken) if self._pm is not None else set()
        if self.upnp_seen:
            out.add("upnp")
        return sorted(out)

    def lease_remaining(self) -> float | None:
        """Seconds left on the lease of the port map in use (metrics); None without one."""
        if self.protocol == "upnp":
            expires = self._upnp_expires
        else:
            expires = self._pm.expires if self._pm is not None and self.protocol is not None else None
        return None if expires is None else max(0.0, expires - self.clock())

    async def close(self, within: float = CLOSE_TIMEOUT) -> None:
        """Stop the loops and delete our mappings; returns within ``within`` seconds whatever happens."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        jobs: list[asyncio.Task[None]] = []
        try:
            await self._tasks.stop(within=min(0.5, within / 4))
            jobs = [
                asyncio.create_task(self._close_natpmp(deadline)),
                asyncio.create_task(self._close_upnp(deadline)),
            ]
            _, pending = await asyncio.wait(jobs, timeout=max(0.0, deadline - loop.time()))
            if pending:
                log.warning(
                    "port maps: not all deleted within %.1f s (the router keeps them until they expire)",
                    within,
                )
        finally:  # also when the caller's own deadline cancels us: no orphan tasks, no open socket
            for t in jobs:
                t.cancel()
            if self._udp is not None:
                self._udp.close()
                self._udp = None

    async def _close_natpmp(self, deadline: float) -> None:
        if self._pm is None or self._udp is None:
            return
        self._pm.close(self.clock())
        loop = asyncio.get_running_loop()
        while not self._pm.closed and loop.time() < deadline:
            self._flush()
            self._pm.handle_timer(self.clock())
            self._wake.clear()
            await wait_set(self._wake, 0.05)  # woken by the router's answer, else poll the timers

    async def _close_upnp(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        adding, self._upnp_adding = self._upnp_adding, None
        maps = [self._upnp] if self._upnp is not None else []
        self._upnp = None
        igd = self._igd
        if adding is not None:
            # a mapping (or its renewal) may be on its way: wait for it (bounded) so it can be deleted
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    maps.append(await asyncio.shield(adding))
            except upnp.UpnpError:
                pass
            except TimeoutError:
                log.warning(
                    "UPnP: a mapping was still being made at close; it expires after %d s", self.lease
                )
                igd = None  # its thread still uses that client: a miniupnpc client is not for two threads
        for port in sorted({m.external_port for m in maps}):
            delete = functools.partial(igd.delete_mapping if igd is not None else upnp.delete_mapping, port)
            try:
                await blocking(delete, within=max(0.0, deadline - loop.time()), name="upnp-delete")
            except (upnp.UpnpError, TimeoutError) as e:
                log.warning("UPnP: deleting UDP %d: %s", port, e or "timed out")

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
            if self._closed:
                continue  # a grant that crossed our delete: the delete (already queued) settles it
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
            await wait_set(self._wake, min(wait, 5.0))

    async def _upnp_loop(self) -> None:
        """Discover an IGD in parallel; map only if NAT-PMP/PCP have not already; renew at half-lease."""
        while True:
            try:
                discover = functools.partial(upnp.Igd.discover, gateway=self.gateway)
                igd = await blocking(discover, within=UPNP_CALL_TIMEOUT, name="upnp-discover")
                await blocking(igd.external_ip, within=UPNP_CALL_TIMEOUT, name="upnp-probe")
                self.upnp_seen = True  # maps nothing: tells netcheck the router speaks UPnP
            except (upnp.UpnpError, TimeoutError) as e:
                log.debug("UPnP: %s", e or "timed out")
                await asyncio.sleep(UPNP_RETRY)
                continue
            if self.protocol not in (None, "upnp"):
                return  # NAT-PMP or PCP got there first
            # the add's future outlives this task: close() waits for it and deletes what it made
            adding = start_blocking(
                functools.partial(igd.add_mapping, self.port, self.lease, self.tag), "upnp-add"
            )
            self._upnp_adding = adding
            try:
                async with asyncio.timeout(UPNP_CALL_TIMEOUT):
                    m = await asyncio.shield(adding)
            except (upnp.UpnpError, TimeoutError) as e:
                log.debug("UPnP: %s", e or "timed out")
                if adding.done():
                    self._upnp_adding = None
                if self.protocol is None:
                    await asyncio.sleep(UPNP_RETRY)
                    continue
                return
            # no await from the add's result to here: close() sees the mapping in one place or the other
            self._igd, self._upnp_adding = igd, None
            if self.protocol not in (None, "upnp"):
                self._upnp = m  # until deleted: a close() meanwhile deletes it too (twice is harmless)
                with contextlib.suppress(upnp.UpnpError, TimeoutError):
                    await blocking(
                        functools.partial(igd.delete_mapping, m.external_port),
                        within=UPNP_CALL_TIMEOUT,
                        name="upnp-delete",
                    )
                self._upnp = None
                return
            self._upnp = m
            self._upnp_expires = self.clock() + m.lease
            if self._pm is not None:
                self._pm.close(self.clock())  # stop probing / give back anything it got
                self._wake.set()
            self._set("upnp", (m.external_ip, m.external_port))
            await asyncio.sleep(max(30.0, self.lease / 2))
