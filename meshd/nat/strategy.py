"""How the daemon asks "which way do packets to this peer go?": one interface, two strategies.

The daemon never branches on whether probes are possible. It talks to a :class:`PathStrategy`:

* :class:`meshd.nat.engine.Traversal` when meshd can open a raw socket on the WireGuard port: STUN,
  probes, call-me-maybe, one :class:`meshd.paths.PeerPath` per peer (relay first, then direct);
* :class:`StaticPaths` otherwise (no CAP_NET_RAW, a kernel without packet sockets): a peer on one of
  our LANs gets its LAN address, every other peer the relay. No probes, so no punching.

Both make the decision that ``meshd status`` shows (:meth:`PathStrategy.path`): status reads it and
adds nothing of its own. Both announce our candidates through one callback, ``on_candidates``, called
whenever the list changes; the control session sends the current list again after each reconnect.

:func:`open_paths` picks the strategy.

"Relay" in a path decision means the relay is really up: while every relay link is down a peer without
a direct path shows (and is) NONE, whichever proxy endpoint WireGuard still points at. The strategy
learns the relay's state from the relay manager: initially through :func:`open_paths`, then
:meth:`PathStrategy.relay_changed`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshd.paths import PathKind, PathStatus
from meshd.peerset import first_reachable_candidate
from meshd.proto.endpoint import Endpoint, format_endpoint
from meshd.supervise import TaskGroup
from meshd.wg.base import WireGuardBackend
from meshd.wg.errors import WgError

log = logging.getLogger("meshd.nat")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
CandidatesCallback = Callable[[list[str]], Coroutine[Any, Any, None]]
SendSignal = Callable[[int, dict[str, Any]], Awaitable[None]]
HANDSHAKE_FRESH = 180.0  #: WireGuard REJECT_AFTER_TIME: an older handshake means no live session
HANDSHAKE_POLL = 1.0


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What a strategy needs to know about one verified peer."""

    name: str
    node_id: int
    wg_key: str  #: base64 WireGuard public key
    node_key: bytes  #: raw Ed25519 node key (probes are sealed to it)
    candidates: tuple[Endpoint, ...]


@dataclass
class NatInfo:
    """What STUN and the router told us (for status and netcheck)."""

    reflexive: dict[Endpoint, Endpoint] = field(default_factory=dict)  #: STUN server -> our mapped address
    portmap: str | None = None  #: "upnp", "natpmp", "pcp" or None
    portmapped: Endpoint | None = None
    #: a STUN question went unanswered (with no answer at all, UDP is likely blocked: path reports)
    stun_unanswered: bool = False

    @property
    def mapping_varies_by_dest(self) -> bool | None:
        mapped = set(self.reflexive.values())
        return None if len(self.reflexive) < 2 else len(mapped) > 1


NO_PATH = PathStatus(PathKind.NONE, None, None)


class PathStrategy(Protocol):
    """The daemon's only view of path selection. Inputs are plain calls; decisions are read back."""

    nat: NatInfo

    @property
    def probing(self) -> bool:
        """True when probes can flow (worth asking the router for a port map)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Stop every task this strategy runs; idempotent."""
        ...

    def set_local(self, networks: Mapping[str, Network]) -> None:
        """Our own addresses: ``{"ifname/addr": network}`` (not loopback, not the mesh interface)."""
        ...

    def set_stun_servers(self, servers: Iterable[Endpoint]) -> None: ...

    def set_peers(self, peers: Iterable[PeerInfo]) -> None: ...

    def on_signal(self, from_node: int, payload: Mapping[str, Any]) -> None:
        """A signal from a peer, relayed by the coordinator (call-me-maybe)."""
        ...

    def relay_changed(self, up: bool) -> None:
        """The relay manager's home link went up or down."""
        ...

    def set_portmap(self, protocol: str | None, external: Endpoint | None) -> None: ...

    def relay_ports(
        self, use: Callable[[str, bool], None], is_relay: Callable[[str, Endpoint | None], bool]
    ) -> None:
        """UDP relay ports (issue 14): tell ``use`` which peers are relayed; ``is_relay`` names a peer's
        relay addresses. A strategy that cannot send from the WireGuard port ignores it (its relayed
        peers stay on the TCP relay's proxy)."""
        ...

    def relay_moved(self, wg_key: str) -> None:
        """A relayed peer's relay endpoint changed (its UDP relay port became usable, or stopped)."""
        ...

    def rekeyed(self) -> None:
        """Our WireGuard key was rotated: every peer needs a first handshake with the new one."""
        ...

    def candidates(self) -> list[str]:
        """Every address a peer may reach us at, ``host:port`` strings, best first."""
        ...

    def path(self, wg_key: str) -> PathStatus:
        """The path decision for one peer, as ``meshd status`` shows it (NONE for an unknown key)."""
        ...

    def endpoint_for(self, wg_key: str, candidates: Iterable[Endpoint]) -> Endpoint | None:
        """The endpoint to put in the desired WireGuard config; None leaves it to the strategy."""
        ...

    def keepalive_on(self, wg_key: str) -> bool:
        """Whether the desired config should carry persistent keepalive for this peer."""
        ...

    async def refresh_stun(self, within: float = 2.0) -> None:
        """Ask the STUN servers again and wait up to ``within`` s for answers (netcheck)."""
        ...


class StaticPaths:
    """No probes possible: LAN address for a peer on one of our LANs, the relay for everyone else."""

    def __init__(
        self,
        *,
        backend: WireGuardBackend,
        port: int,
        relay_endpoint: Callable[[str], Endpoint | None],
        on_candidates: CandidatesCallback,
        relay_up: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.port = port
        self.relay_endpoint = relay_endpoint
        self.on_candidates = on_candidates
        self.clock = clock
        self.nat = NatInfo()
        self._networks: dict[str, Network] = {}
        self._peers: dict[str, PeerInfo] = {}
        self._relay_up = relay_up
        self._announced: list[str] = []
        self._handshakes: dict[str, float] = {}  #: wg key -> last handshake (wall clock)
        self._loops = TaskGroup()
        self._side: set[asyncio.Task[None]] = set()  # announcements in flight

    @property
    def probing(self) -> bool:
        return False

    async def start(self) -> None:
        self._loops.start("paths-handshakes", self._handshake_loop)

    async def close(self) -> None:
        side, self._side = self._side, set()
        for t in side:
            t.cancel()
        await self._loops.stop(within=1.0)
        if side:
            await asyncio.wait(side, timeout=1.0)

    def set_local(self, networks: Mapping[str, Network]) -> None:
        self._networks = dict(networks)
        cands = self.candidates()
        if cands != self._announced:
            self._announced = cands
            task = asyncio.get_running_loop().create_task(self._announce(cands))
            self._side.add(task)  # kept until done, so it is neither collected nor left running by close()
            task.add_done_callback(self._side.discard)

    async def _announce(self, cands: list[str]) -> None:
        try:
            await self.on_candidates(cands)
        except Exception as e:
            log.warning("announcing candidates: %s", e)

    def set_stun_servers(self, servers: Iterable[Endpoint]) -> None:
        return None  # STUN needs the raw socket we do not have

    def set_peers(self, peers: Iterable[PeerInfo]) -> None:
        self._peers = {p.wg_key: p for p in peers}
        self._handshakes = {k: v for k, v in self._handshakes.items() if k in self._peers}

    def on_signal(self, from_node: int, payload: Mapping[str, Any]) -> None:
        return None  # nothing to punch with

    def relay_changed(self, up: bool) -> None:
        self._relay_up = up

    def set_portmap(self, protocol: str | None, external: Endpoint | None) -> None:
        self.nat.portmap, self.nat.portmapped = protocol, external

    def relay_ports(
        self, use: Callable[[str, bool], None], is_relay: Callable[[str, Endpoint | None], bool]
    ) -> None:
        return None  # binding a UDP relay port needs the raw socket on the WireGuard port

    def relay_moved(self, wg_key: str) -> None:
        return None  # never asked for a UDP relay port, so none moves

    def rekeyed(self) -> None:
        return None  # endpoints are static: WireGuard's own retries carry the new key's handshakes

    def candidates(self) -> list[str]:
        out = []
        for key in sorted(self._networks):
            out.append(format_endpoint((key.split("/", 1)[1], self.port)))
        return out

    def _lan(self, candidates: Iterable[Endpoint]) -> Endpoint | None:
        return first_reachable_candidate(candidates, self._networks)

    def endpoint_for(self, wg_key: str, candidates: Iterable[Endpoint]) -> Endpoint | None:
        return self._lan(candidates) or self.relay_endpoint(wg_key)

    def keepalive_on(self, wg_key: str) -> bool:
        return False  # an endpoint is always set, and that alone turns keepalive on (peerset.wg_peers)

    def path(self, wg_key: str) -> PathStatus:
        p = self._peers.get(wg_key)
        if p is None:
            return NO_PATH
        lan = self._lan(p.candidates)
        if lan is not None:
            hs = self._handshakes.get(wg_key)
            fresh = hs is not None and self.clock() - hs < HANDSHAKE_FRESH
            return PathStatus(PathKind.DIRECT, lan, None) if fresh else NO_PATH
        return PathStatus(PathKind.RELAY, None, None) if self._relay_up else NO_PATH

    async def refresh_stun(self, within: float = 2.0) -> None:
        return None

    async def _handshake_loop(self) -> None:
        while True:
            await asyncio.sleep(HANDSHAKE_POLL)
            try:
                state = await self.backend.state()
            except WgError as e:
                log.debug("reading handshakes: %s", e)
                continue
            for ps in state.peers:
                if ps.public_key in self._peers and ps.last_handshake:
                    self._handshakes[ps.public_key] = ps.last_handshake


async def open_paths(
    *,
    backend: WireGuardBackend,
    node_seed: bytes,
    port: int,
    relay_endpoint: Callable[[str], Endpoint | None],
    own_key: Callable[[], str],
    on_candidates: CandidatesCallback,
    send_signal: SendSignal,
    relay_up: bool,
) -> PathStrategy:
    """The started strategy for this host: traversal when the raw socket opens, else static paths.

    ``relay_endpoint`` gives a peer's local relay proxy (None without one), ``own_key`` our WireGuard
    public key (base64), ``relay_up`` whether the relay is up now (later changes: ``relay_changed``).
    """
    from meshd.nat.engine import Traversal  # the engine imports this module's types

    traversal = Traversal(
        backend=backend,
        node_seed=node_seed,
        port=port,
        send_signal=send_signal,
        on_candidates=on_candidates,
        relay_endpoint=relay_endpoint,
        own_key=own_key,
        relay_up=relay_up,
    )
    try:
        await traversal.start()
        return traversal
    except OSError as e:  # RawPortError is one: no CAP_NET_RAW, or no packet sockets in this kernel
        log.warning("no probes on the WireGuard port (%s): LAN addresses and the relay only", e)
        await traversal.close()
    static = StaticPaths(
        backend=backend,
        port=port,
        relay_endpoint=relay_endpoint,
        on_candidates=on_candidates,
        relay_up=relay_up,
    )
    await static.start()
    return static
