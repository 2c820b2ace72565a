"""NAT traversal for every peer of one node, sans-IO: the pieces wired together.

:class:`TraversalCore` owns one :class:`meshd.paths.PeerPath` per peer and routes between them and the
other sans-IO pieces: a path machine's probes go through :class:`meshd.nat.punch.Punch` (which holds
them for a moment agreed with the peer) and are sealed by :class:`meshd.nat.probes.Probes`; datagrams
arriving on the WireGuard port go to :class:`meshd.nat.gather.Gatherer` (STUN) or back to the path
machines (probes and their answers); our candidates come from the gatherer.

Like its pieces it owns no socket, clock or task. The asyncio shell (:class:`meshd.nat.engine.Traversal`)
feeds it inputs with ``now`` (monotonic), calls :meth:`TraversalCore.handle_timer` at
:meth:`TraversalCore.next_timer`, and carries out what :meth:`TraversalCore.next_event` hands out:
:class:`Datagram` (send from the WireGuard port), :class:`CallPeer` (a call-me-maybe through the
coordinator), :class:`Decided` (point WireGuard at the peer's new path) and :class:`Announce` (tell the
coordinator our candidates).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshd.nat.gather import Gatherer
from meshd.nat.probes import Answered, Pinged, Probes
from meshd.nat.punch import Call, Probe, Punch, Restart
from meshd.nat.strategy import NO_PATH, NatInfo, Network, PeerInfo
from meshd.paths import (
    PathConfig,
    PathKind,
    PathStatus,
    PeerPath,
    SendKeepalives,
    SendProbes,
    UseDirect,
    UseRelay,
)
from meshd.proto import disco, stun
from meshd.proto.cmm import CallMeMaybe
from meshd.proto.endpoint import Endpoint, format_endpoint
from meshd.proto.netmap import MAX_CANDIDATES

log = logging.getLogger("meshd.nat")
KEEPALIVE_TTL = 1  #: dies at our first router, after it refreshed the mapping (meshd.paths, sequenced rounds)


@dataclass(frozen=True, slots=True)
class Datagram:
    """Send ``data`` to ``dst`` from the WireGuard port."""

    data: bytes
    dst: Endpoint
    ttl: int | None = None  #: an IP TTL other than the default (sequenced rounds' keepalives)


@dataclass(frozen=True, slots=True)
class CallPeer:
    """Send node ``node_id`` a call-me-maybe: our ``candidates``, probing at ``at`` (``now`` timeline)."""

    node_id: int
    candidates: tuple[Endpoint, ...]
    at: float

    def message(self, now: float, wall: float) -> CallMeMaybe:
        """The signal to send, its moment as Unix time."""
        return CallMeMaybe(self.candidates, wall + self.at - now)


@dataclass(frozen=True, slots=True)
class Decided:
    """Point the peer's WireGuard endpoint where ``decision`` says (``name`` is for the log)."""

    peer: str
    name: str
    decision: UseDirect | UseRelay


@dataclass(frozen=True, slots=True)
class Announce:
    """Our candidates changed: tell the coordinator (``host:port`` strings, best first)."""

    candidates: list[str]


CoreEvent = Datagram | CallPeer | Decided | Announce


@dataclass
class _Peer:
    info: PeerInfo
    path: PeerPath
    candidates: tuple[Endpoint, ...]  #: the map's, or fresher ones from the peer's call-me-maybe
    seq_round: tuple[int, bool] | None = None  #: last logged sequenced round


class TraversalCore:
    """Path machines, punch timing, probes and STUN for every peer; see the module docstring."""

    def __init__(
        self, node_seed: bytes, port: int, *, relay_up: bool, config: PathConfig | None = None
    ) -> None:
        self.config = config or PathConfig()
        self.nat = NatInfo()
        self._gather = Gatherer(port, self.nat)
        self._probes = Probes(node_seed)
        self._punch = Punch(lambda key: self.path(key).path is PathKind.DIRECT)
        self._relay_up = relay_up
        self._probing = False  # no probes before start(): nothing could send them
        self._peers: dict[str, _Peer] = {}  # wg key -> peer
        self._by_node_key: dict[bytes, str] = {}
        self._by_node_id: dict[int, str] = {}
        self._announced: list[str] = []
        self._events: deque[CoreEvent] = deque()

    # --- inputs ----------------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Datagrams can flow from now on: probe, and wait a while for STUN before punching."""
        self._probing = True
        self._punch.start(now)

    def set_local(self, networks: Mapping[str, Network], now: float) -> None:
        self._gather.set_local(networks)
        self._candidates_changed(now)

    def set_stun_servers(self, servers: Iterable[Endpoint], now: float) -> None:
        if self._gather.set_servers(servers, now) and not self._gather.servers:
            self._punch.gathered(now)  # nobody to ask: our candidates are what they are
        self._drain(now)

    def set_portmap(self, protocol: str | None, external: Endpoint | None, now: float) -> None:
        self._gather.set_portmap(protocol, external)
        self._candidates_changed(now)

    def query_stun(self, now: float) -> None:
        self._gather.query(now)

    def set_peers(self, peers: Iterable[PeerInfo], now: float) -> None:
        infos = {i.wg_key: i for i in peers}
        for key, info in infos.items():
            p = self._peers.get(key)
            if p is None:
                leads = self._probes.keys.public < info.node_key  # the two sides disagree
                path = PeerPath(key, now, config=self.config, relay_up=self._relay_up, leads=leads)
                p = self._peers[key] = _Peer(info, path, info.candidates)
                self._punch.add(key, lead=leads)
                path.set_candidates(self._gather.classify(info.candidates), now)
                continue
            p.info = info
            if info.candidates != p.candidates:
                log.debug("%s: candidates from the map: %d", info.name, len(info.candidates))
                p.candidates = info.candidates
                self._punch.peer_candidates_changed(key)
                p.path.set_candidates(self._gather.classify(info.candidates), now)
        for key in [k for k in self._peers if k not in infos]:
            gone = self._peers.pop(key)
            self._punch.remove(key)
            self._probes.forget(gone.info.node_key)
        self._by_node_key = {p.info.node_key: k for k, p in self._peers.items()}
        self._by_node_id = {p.info.node_id: k for k, p in self._peers.items()}
        self._drain(now)

    def called(self, from_node: int, cmm: CallMeMaybe, now: float, wall: float) -> None:
        """A peer's call-me-maybe: probe it at the moment proposed (its fresh candidates ride along)."""
        key = self._by_node_id.get(from_node)
        if key is None:
            return
        p = self._peers[key]
        log.debug("%s: call-me-maybe received (%d candidates)", p.info.name, len(cmm.candidates))
        if cmm.candidates and set(cmm.candidates) != set(p.candidates):
            p.candidates = cmm.candidates
            p.path.set_candidates(self._gather.classify(cmm.candidates), now)
        self._punch.called(key, cmm.at, now, wall)
        self._drain(now)

    def relay_changed(self, up: bool, now: float) -> None:
        self._relay_up = up
        for p in self._peers.values():
            p.path.relay_up(now) if up else p.path.relay_down(now)
        self._drain(now)

    def handshakes(self, last: Iterable[tuple[str, float | None]], now: float) -> None:
        """WireGuard's last handshake per peer, on the ``now`` timeline (poll every second or so)."""
        for key, at in last:
            if (p := self._peers.get(key)) is not None:
                p.path.handshake(at, now)
        self._drain(now)

    def receive(self, datagrams: Iterable[tuple[Endpoint, bytes]], now: float) -> None:
        """Datagrams that arrived on the WireGuard port, ``(source, payload)``: STUN answers or probes."""
        for src, data in datagrams:
            if stun.looks_like_stun(data):
                self._gather.receive(data, src, now)
                self._stun_results(now)
            elif disco.looks_like_disco(data):
                self._on_probe(src, data, now)
        self._drain(now)

    # --- timers ----------------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        timers = [t for p in self._peers.values() if (t := p.path.next_timer()) is not None]
        timers += [t for t in (self._punch.next_timer(), self._gather.next_timer()) if t is not None]
        return min(timers) if timers else None

    def handle_timer(self, now: float) -> None:
        for p in self._peers.values():
            t = p.path.next_timer()
            if t is not None and t <= now:
                p.path.handle_timer(now)
        self._punch.handle_timer(now)
        self._gather.handle_timer(now)
        if self._probing:
            self._events.extend(Datagram(data, dst) for data, dst in self._gather.datagrams_to_send(now))
        self._stun_results(now)
        self._probes.expire(now)
        self._drain(now)

    # --- outputs ---------------------------------------------------------------------------------------

    def next_event(self) -> CoreEvent | None:
        return self._events.popleft() if self._events else None

    def path(self, wg_key: str) -> PathStatus:
        p = self._peers.get(wg_key)
        return p.path.status if p else NO_PATH

    def candidates(self) -> list[str]:
        return [format_endpoint(e) for e in self._gather.candidates()]

    @property
    def stun_idle(self) -> bool:
        """No STUN question waits for an answer."""
        return self._gather.idle

    @property
    def stun_servers(self) -> list[Endpoint]:
        return self._gather.servers

    # --- internals -------------------------------------------------------------------------------------

    def _candidates_changed(self, now: float) -> None:
        cands = self.candidates()
        if cands != self._announced:
            self._announced = cands
            self._events.append(Announce(cands))
            self._punch.candidates_changed()  # peers without a direct path hear them with a moment to punch
        self._drain(now)

    def _stun_results(self, now: float) -> None:
        changed = self._gather.results()
        if self._gather.idle and self._gather.servers:
            self._punch.gathered(now)
        if changed:
            self._candidates_changed(now)

    def _drain(self, now: float) -> None:
        """Route every pending decision of the path machines and the punch timer until none is left."""
        busy = True
        while busy:
            busy = False
            for key, p in self._peers.items():
                while (ev := p.path.next_event()) is not None:
                    busy = True
                    if isinstance(ev, SendProbes):
                        if self._probing and ev.immediate:
                            self._send_probes(p, ev.endpoints, now)
                        elif self._probing:
                            # on-link addresses at once: no router to open, so no STUN to wait for nor
                            # moment to agree (same LAN direct in one round trip, issue 15)
                            near = [e for e in ev.endpoints if self._gather.on_link(e)]
                            self._send_probes(p, near, now)
                            far = [e for e in ev.endpoints if e not in near]
                            self._punch.probe(key, far, now, first=ev.first)
                    elif isinstance(ev, SendKeepalives):
                        if self._probing:
                            self._send_probes(p, ev.endpoints, now, ttl=KEEPALIVE_TTL)
                    else:
                        self._decide(p, ev)
                if (r := p.path.seq_round) != p.seq_round:
                    p.seq_round = r
                    if r is not None:
                        role = "keeping our mapping (TTL-1 probes)" if r[1] else "quiet, then probing"
                        log.info("%s: no answer; sequenced round %d: %s", p.info.name, r[0], role)
            while (pe := self._punch.next_event()) is not None:
                busy = True
                q = self._peers.get(pe.peer)
                if q is None:
                    continue  # the peer left since
                if isinstance(pe, Restart):
                    q.path.peer_asked(now, pe.at) if pe.by_peer else q.path.retry_now(now)
                elif isinstance(pe, Probe):
                    if q.path.seq_round is None:  # held probes must not break a round's silence
                        self._send_probes(q, pe.endpoints, now)
                else:
                    self._call(q, pe, now)

    def _decide(self, p: _Peer, ev: UseDirect | UseRelay) -> None:
        if isinstance(ev, UseDirect):
            via = format_endpoint(ev.endpoint)
            log.info("%s: direct via %s (%.1f ms, %s)", p.info.name, via, ev.rtt * 1000, ev.reason)
        else:
            log.info("%s: relay (%s)", p.info.name, ev.reason)
        self._events.append(Decided(p.info.wg_key, p.info.name, ev))

    def _call(self, p: _Peer, ev: Call, now: float) -> None:
        cands = tuple(self._gather.candidates()[:MAX_CANDIDATES])  # a longer list would be refused
        self._events.append(CallPeer(p.info.node_id, cands, ev.at))
        p.path.calling(now, ev.at)
        log.debug("%s: call-me-maybe sent (%d candidates)", p.info.name, len(cands))

    def _send_probes(
        self, p: _Peer, targets: Iterable[Endpoint], now: float, *, ttl: int | None = None
    ) -> None:
        for ep in targets:
            try:
                ping = self._probes.ping(p.info.wg_key, p.info.node_key, ep, now)
                self._events.append(Datagram(ping, ep, ttl))
            except disco.DiscoError as e:
                log.debug("probe to %s: %s", format_endpoint(ep), e)

    def _on_probe(self, src: Endpoint, data: bytes, now: float) -> None:
        try:
            got = self._probes.receive(data, src, self._by_node_key, now)
        except disco.DiscoError as e:
            log.debug("probe from %s dropped: %s", format_endpoint(src), e)
            return
        if isinstance(got, Pinged):
            self._events.append(Datagram(got.reply, src))
            self._peers[got.peer].path.probe_received(src, now)
        elif isinstance(got, Answered):
            q = self._peers[got.peer]
            log.debug("%s: probe to %s answered", q.info.name, format_endpoint(got.sent_to))
            q.path.probe_answered(got.sent_to, got.src, got.rtt, now)
