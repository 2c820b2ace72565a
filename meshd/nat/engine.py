"""NAT traversal, the asyncio shell: the :class:`meshd.nat.strategy.PathStrategy` that probes.

The protocol work is done by sans-IO pieces, wired together in :class:`meshd.nat.core.TraversalCore`
(STUN, probes, call-me-maybe timing, one :class:`meshd.paths.PeerPath` per peer). This module only
moves bytes and time between them and the world:

* :class:`meshd.nat.rawport.RawPort` sends and receives STUN and probes on the WireGuard port itself;
* the coordinator carries call-me-maybe signals (``send_signal``, :mod:`meshd.proto.cmm`) and hears
  our candidates (``on_candidates``);
* :class:`meshd.nat.endpoints.WgEndpoints` points WireGuard where the path machines decided.

Every loop runs supervised (:mod:`meshd.supervise`): an unexpected exception is logged and the loop
restarted, never lost. :meth:`Traversal.close` stops all of it, one-off sends included, within
``STOP_WITHIN`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

from meshd.nat.core import Announce, CallPeer, Datagram, Decided, TraversalCore
from meshd.nat.endpoints import WgEndpoints
from meshd.nat.rawport import RawPort, RawPortError
from meshd.nat.strategy import CandidatesCallback, NatInfo, Network, PeerInfo, SendSignal
from meshd.paths import PathConfig, PathStatus
from meshd.proto.cmm import CallMeMaybe, CallMeMaybeError
from meshd.proto.endpoint import Endpoint, format_endpoint
from meshd.supervise import TaskGroup
from meshd.wg.base import WireGuardBackend

log = logging.getLogger("meshd.nat")

STUN_REFRESH = 20.0
HANDSHAKE_POLL = 1.0
STOP_WITHIN = 1.0  #: close() waits this long for the tasks to end
READ_BATCH = 64  #: datagrams read per wake-up before the decisions are carried out


class Traversal:
    """Direct paths for every peer of one daemon (over IPv4 and IPv6)."""

    def __init__(
        self,
        *,
        backend: WireGuardBackend,
        node_seed: bytes,
        port: int,
        send_signal: SendSignal,
        on_candidates: CandidatesCallback,
        relay_endpoint: Callable[[str], Endpoint | None] = lambda wg_key: None,
        own_key: Callable[[], str] = lambda: "",
        relay_up: bool = False,
        config: PathConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.port = port
        self.send_signal = send_signal
        self.on_candidates = on_candidates
        self.clock, self.wall = clock, wall
        self._core = TraversalCore(node_seed, port, relay_up=relay_up, config=config)
        self.nat: NatInfo = self._core.nat
        # own_key: our WireGuard public key (base64), tells who starts the first handshake
        self._wg = WgEndpoints(
            backend, relay_endpoint=relay_endpoint, own_key=own_key, clock=clock, wall=wall
        )
        self._raw: RawPort | None = None
        self._wake = asyncio.Event()
        self._stun_idle = asyncio.Event()
        self._loops = TaskGroup()
        self._side: set[asyncio.Task[None]] = set()  # call-me-maybe sends, announcements
        self._closed = False

    # -- life cycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the raw socket (raises ``RawPortError``/``OSError`` when it cannot) and start the loops."""
        if self._closed:
            raise RuntimeError("traversal closed")
        self._raw = RawPort(self.port)
        self._core.start(self.clock())
        for fd in self._raw.filenos():  # IPv4, and IPv6 when the host has it (issue 15)
            asyncio.get_running_loop().add_reader(fd, self._readable)
        self._loops.start("nat-timers", self._timer_loop)
        self._loops.start("nat-endpoints", self._wg.apply_loop)
        self._loops.start("nat-stun", self._stun_loop)
        self._loops.start("nat-handshakes", self._handshake_loop)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        side, self._side = self._side, set()
        for t in side:
            t.cancel()
        waits: list[Awaitable[Any]] = [self._loops.stop(within=STOP_WITHIN)]
        if side:
            waits.append(asyncio.wait(side, timeout=STOP_WITHIN))
        try:
            await asyncio.gather(*waits)
        finally:  # even when the caller gives up waiting: the socket never outlives close()
            if self._raw is not None:
                for fd in self._raw.filenos():
                    asyncio.get_running_loop().remove_reader(fd)
                self._raw.close()
                self._raw = None

    # -- PathStrategy: inputs ---------------------------------------------------------------------------

    @property
    def probing(self) -> bool:
        return self._raw is not None

    def set_local(self, networks: Mapping[str, Network]) -> None:
        self._core.set_local(networks, self.clock())
        self._carry_out()

    def set_stun_servers(self, servers: Iterable[Endpoint]) -> None:
        self._core.set_stun_servers(servers, self.clock())
        self._carry_out()

    def set_peers(self, peers: Iterable[PeerInfo]) -> None:
        infos = list(peers)
        self._core.set_peers(infos, self.clock())
        self._wg.retain({i.wg_key for i in infos})
        self._carry_out()

    def on_signal(self, from_node: int, payload: Mapping[str, Any]) -> None:
        try:
            cmm = CallMeMaybe.decode(payload)
        except CallMeMaybeError as e:
            log.debug("signal from node %d ignored: %s", from_node, e)
            return
        self._core.called(from_node, cmm, self.clock(), self.wall())
        self._carry_out()

    def relay_changed(self, up: bool) -> None:
        self._core.relay_changed(up, self.clock())
        self._carry_out()

    def relay_ports(
        self, use: Callable[[str, bool], None], is_relay: Callable[[str, Endpoint | None], bool]
    ) -> None:
        """UDP relay ports (issue 14): tell ``use`` which peers are relayed; ``is_relay`` names a peer's
        relay addresses (TCP relay proxy or UDP relay port). See :meth:`relay_moved`."""
        self._wg.relay_use = use
        self._wg.is_relay = is_relay

    def relay_moved(self, wg_key: str) -> None:
        """A relayed peer's relay endpoint changed (its UDP relay port became usable, or stopped)."""
        self._wg.relay_moved(wg_key)

    def rekeyed(self) -> None:
        """Our WireGuard key was rotated (meshd.nat.endpoints: handshakes of the old key count as none)."""
        self._wg.rekeyed()

    def set_portmap(self, protocol: str | None, external: Endpoint | None) -> None:
        self._core.set_portmap(protocol, external, self.clock())
        self._carry_out()

    async def refresh_stun(self, within: float = 2.0) -> None:
        if self._raw is None or not self._core.stun_servers:
            return
        self._core.query_stun(self.clock())
        self._stun_idle.clear()
        self._wake.set()
        with contextlib.suppress(TimeoutError):  # asyncio.timeout: 3.11's wait_for can swallow a cancel
            async with asyncio.timeout(within):
                await self._stun_idle.wait()

    # -- PathStrategy: decisions ------------------------------------------------------------------------

    def candidates(self) -> list[str]:
        return self._core.candidates()

    def path(self, wg_key: str) -> PathStatus:
        return self._core.path(wg_key)

    def endpoint_for(self, wg_key: str, candidates: Iterable[Endpoint]) -> Endpoint | None:
        # endpoints are set here, once a probe was answered (or the relay proxy); only the lower key's
        # new peer is added with its relay proxy (meshd.nat.endpoints: no packet may find it without one)
        return self._wg.first_endpoint(wg_key)

    def keepalive_on(self, wg_key: str) -> bool:
        return self._wg.keepalive_on(wg_key)

    # -- internals ---------------------------------------------------------------------------------------

    def _carry_out(self) -> None:
        """Do what the core decided, and let the timer loop look at its timers again."""
        while (ev := self._core.next_event()) is not None:
            if isinstance(ev, Datagram):
                if self._raw is not None:
                    try:
                        self._raw.send(ev.data, ev.dst, ttl=ev.ttl)
                    except RawPortError as e:
                        log.debug("to %s: %s", format_endpoint(ev.dst), e)
            elif isinstance(ev, Decided):
                self._wg.decide(ev.peer, ev.name, ev.decision)
            elif isinstance(ev, CallPeer):
                payload = ev.message(self.clock(), self.wall()).encode()
                # no coordinator now: the path machine's next attempt calls again
                self._spawn(
                    self._quietly(self.send_signal(ev.node_id, payload), "call-me-maybe", logging.DEBUG)
                )
            elif isinstance(ev, Announce):
                # the control session sends the current list again after each reconnect
                self._spawn(self._quietly(self.on_candidates(ev.candidates), "announcing candidates"))
        if self._core.stun_idle:
            self._stun_idle.set()
        self._wake.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A one-off task, kept (so it is not collected mid-flight) and cancelled by close()."""
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    @staticmethod
    async def _quietly(coro: Awaitable[None], what: str, level: int = logging.WARNING) -> None:
        """Await a one-off send; a failure is logged, not raised (nobody awaits this task)."""
        try:
            await coro
        except Exception as e:
            log.log(level, "%s: %s", what, e)

    def _readable(self) -> None:
        if self._raw is None:
            return
        got = []
        for _ in range(READ_BATCH):
            if (d := self._raw.recv()) is None:
                break
            got.append(d)
        self._core.receive(got, self.clock())
        self._carry_out()

    # -- tasks (supervised: restarted with a logged traceback if they raise) -------------------------------

    async def _timer_loop(self) -> None:
        while True:
            self._core.handle_timer(self.clock())
            self._carry_out()
            self._wake.clear()
            t = self._core.next_timer()
            wait = 1.0 if t is None else min(max(0.0, t - self.clock()), 1.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _stun_loop(self) -> None:
        while True:
            self._core.query_stun(self.clock())
            self._wake.set()
            await asyncio.sleep(STUN_REFRESH)

    async def _handshake_loop(self) -> None:
        while True:
            await asyncio.sleep(HANDSHAKE_POLL)
            self._core.handshakes(await self._wg.handshakes(), self.clock())
            self._carry_out()
