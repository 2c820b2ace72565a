"""NAT traversal, the asyncio shell: candidates, probes and one path machine per peer.

The protocol work is done by sans-IO pieces; this module only moves bytes and time between them:

* :class:`meshd.nat.rawport.RawPort` sends and receives on the WireGuard port itself;
* :class:`meshd.proto.stun.BindingClient` learns our public address(es) from the coordinator's STUN
  ports (two ports: if they see different mappings, our NAT's mapping varies by destination);
* :class:`meshd.nat.portmap.PortMapper` (NAT-PMP/PCP) and :mod:`meshd.nat.upnp` ask the router for a
  time-bound port map;
* :mod:`meshd.proto.disco` seals probes between node keys; a probe is answered at the address it came from
  (peer-reflexive), and the address is adopted as a candidate of that peer;
* :class:`meshd.paths.PeerPath` decides, per peer, relay or direct (and which direct address), and this
  shell carries the decisions out on WireGuard with ``set_endpoint``.

"Call me maybe": when a peer without a direct path starts an attempt, we tell it through the coordinator
(a signal message) so that it probes us at the same moment; simultaneous probes open both NATs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from meshd.nat.rawport import RawPort, RawPortError
from meshd.paths import (
    Candidate,
    CandidateKind,
    PathConfig,
    PathStatus,
    PeerPath,
    SendProbes,
    UseDirect,
    UseRelay,
)
from meshd.peerset import KEEPALIVE_SECONDS, parse_candidates
from meshd.proto import disco, stun
from meshd.proto.endpoint import Endpoint, format_endpoint
from meshd.wg.base import WireGuardBackend
from meshd.wg.errors import WgError

log = logging.getLogger("meshd.nat")

STUN_REFRESH = 20.0
CMM_MIN_INTERVAL = 2.0
PUNCH_DELAY = 0.25  #: a new attempt's first probes go out this long after the call-me-maybe is sent
MAX_PUNCH_WAIT = 1.0
GATHER_TIMEOUT = 2.0  #: probes wait at most this long after start for our STUN answers
TXID_TTL = 5.0
HANDSHAKE_POLL = 1.0
KEEPALIVE_FALLBACK = 1.0  #: the higher-key side turns keepalive on after this long without a handshake


@dataclass
class _Peer:
    name: str
    node_id: int
    wg_key: str
    node_key: bytes
    path: PeerPath
    candidates: tuple[Endpoint, ...] = ()
    last_cmm: float = -1e9
    hold_until: float | None = None  #: probes wait until this moment (agreed with the peer)
    my_at: float | None = None  #: the wall-clock moment our last call-me-maybe proposed
    held: set[Endpoint] = field(default_factory=set)
    direct: Endpoint | None = None
    endpoint: Endpoint | None = None  #: what WireGuard was last pointed at (direct or relay proxy)
    endpoint_at: float | None = None  #: when the peer first got an endpoint
    keepalive_on: bool = False  #: persistent keepalive enabled on this peer


@dataclass
class _Sent:
    peer: str  # wg key
    to: Endpoint
    at: float


@dataclass
class NatInfo:
    """What STUN and the router told us (for status and netcheck)."""

    reflexive: dict[Endpoint, Endpoint] = field(default_factory=dict)  #: STUN server -> our mapped address
    portmap: str | None = None  #: "upnp", "natpmp", "pcp" or None
    portmapped: Endpoint | None = None

    @property
    def mapping_varies_by_dest(self) -> bool | None:
        mapped = set(self.reflexive.values())
        return None if len(self.reflexive) < 2 else len(mapped) > 1


class Traversal:
    """Direct paths for every peer of one daemon (IPv4 for now)."""

    def __init__(
        self,
        *,
        backend: WireGuardBackend,
        node_seed: bytes,
        port: int,
        stun_servers: Iterable[Endpoint],
        send_signal: Callable[[int, dict[str, Any]], Awaitable[None]],
        relay_endpoint: Callable[[str], Endpoint | None] = lambda wg_key: None,
        own_key: Callable[[], str] = lambda: "",
        config: PathConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.keys = disco.DiscoKeys(node_seed)
        self.port = port
        self.stun_servers = list(stun_servers)
        self.send_signal = send_signal
        self.relay_endpoint = relay_endpoint
        self.own_key = own_key  #: our WireGuard public key (base64), for who starts the first handshake
        self.config = config or PathConfig()
        self.clock = clock
        self.nat = NatInfo()
        self.local: list[Endpoint] = []
        self.local_nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.on_candidates: Callable[[list[str]], Coroutine[Any, Any, None]] | None = None
        self._peers: dict[str, _Peer] = {}  # wg key -> peer
        self._by_node_key: dict[bytes, _Peer] = {}
        self._sent: dict[bytes, _Sent] = {}
        self._stun = stun.BindingClient(rto=0.2, max_sends=5, software="meshd")
        self._raw: RawPort | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._effects: asyncio.Queue[UseDirect | UseRelay] = asyncio.Queue()
        self._announced: list[str] = []
        self._gathered = False  #: STUN has answered (or given up) since start: our candidates are complete
        self._stun_idle = asyncio.Event()
        self._gather_deadline: float | None = None

    # -- life cycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._raw = RawPort(self.port)
        except (RawPortError, OSError) as e:
            log.warning("no probes on the WireGuard port (%s): peers stay on the relay", e)
            return
        self._gather_deadline = self.clock() + GATHER_TIMEOUT
        loop = asyncio.get_running_loop()
        loop.add_reader(self._raw.fileno(), self._readable)
        self._tasks = [
            asyncio.create_task(self._timer_loop(), name="nat-timers"),
            asyncio.create_task(self._effect_loop(), name="nat-effects"),
            asyncio.create_task(self._stun_loop(), name="nat-stun"),
            asyncio.create_task(self._handshake_loop(), name="nat-handshakes"),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._raw is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._raw.fileno())
            self._raw.close()
            self._raw = None

    # -- inputs from the daemon --------------------------------------------------------------------------

    def set_local(self, addresses: Iterable[str], networks: Iterable[Any]) -> None:
        """Our LAN addresses (candidates for peers on the same LAN) and the networks they are on."""
        self.local = [(a, self.port) for a in addresses if ":" not in a]
        self.local_nets = list(networks)
        self._candidates_changed()

    def set_stun_servers(self, servers: Iterable[Endpoint]) -> None:
        """Where to learn our public address (the relay regions' STUN ports); asks them at once if new."""
        new = list(dict.fromkeys(servers))
        if new != self.stun_servers:
            self.stun_servers = new
            self.nat.reflexive = {k: v for k, v in self.nat.reflexive.items() if k in new}
            now = self.clock()
            for server in new:
                self._stun.query(server, now)
            if not new:
                self._gathered_now(now)
            self._wake.set()

    def _gathered_now(self, now: float) -> None:
        """Our candidates are as complete as they will get soon: start synchronised attempts."""
        if self._gathered:
            return
        self._gathered = True
        for p in self._peers.values():
            if p.path.status.path != "direct":
                p.last_cmm = -1e9
                p.path.peer_asked(now)  # (an attempt already running probes again within 0.5 s)
        self._drain(now)

    async def refresh_stun(self, within: float = 2.0) -> None:
        """Ask every STUN server again now and wait (up to ``within`` s) for the answers (netcheck)."""
        if self._raw is None or not self.stun_servers:
            return
        now = self.clock()
        for server in self.stun_servers:
            self._stun.query(server, now)
        self._stun_idle.clear()
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stun_idle.wait(), within)

    def candidates(self) -> list[str]:
        """Every address a peer may reach us at: LAN, STUN-reflexive, port-mapped (in that order)."""
        out: list[Endpoint] = list(self.local)
        out += [m for m in self.nat.reflexive.values()]
        if self.nat.portmapped is not None:
            out.append(self.nat.portmapped)
        return [format_endpoint(e) for e in dict.fromkeys(out)]

    def set_peers(self, peers: Iterable[tuple[str, int, str, bytes, Iterable[Endpoint]]]) -> None:
        """(name, node id, WireGuard key, node key, candidates) of every configured peer."""
        now = self.clock()
        seen: set[str] = set()
        for name, node_id, wg_key, node_key, cands in peers:
            seen.add(wg_key)
            cand_t = tuple(cands)
            p = self._peers.get(wg_key)
            if p is None:
                p = _Peer(
                    name,
                    node_id,
                    wg_key,
                    node_key,
                    PeerPath(wg_key, now, config=self.config, relay_up=self._relay_for(wg_key)),
                )
                self._peers[wg_key] = p
                self._by_node_key[node_key] = p
                p.candidates = cand_t
                p.path.set_candidates(self._classify(cand_t), now)
            elif cand_t != p.candidates:
                p.candidates = cand_t
                p.last_cmm = -1e9  # new addresses: agree on a new moment with the peer before probing them
                p.path.set_candidates(self._classify(cand_t), now)
        for key in [k for k in self._peers if k not in seen]:
            gone = self._peers.pop(key)
            self._by_node_key.pop(gone.node_key, None)
            self.keys.forget(gone.node_key)
        self._drain(now)

    def on_signal(self, from_node: int, payload: dict[str, Any]) -> None:
        """A "call me maybe" from a peer: probe it now (its fresh candidates ride along)."""
        p = next((q for q in self._peers.values() if q.node_id == from_node), None)
        if p is None or payload.get("type") != "cmm":
            return
        now = self.clock()
        cands = payload.get("candidates")
        if isinstance(cands, list):
            parsed = tuple(parse_candidates(c for c in cands if isinstance(c, str)))
            if parsed and set(parsed) != set(p.candidates):
                p.candidates = parsed
                p.path.set_candidates(self._classify(parsed), now)
        at = payload.get("at")
        if isinstance(at, int | float) and not isinstance(at, bool):
            # both sides may have asked at once: both then use the later of the two moments
            wall = time.time()
            moment = float(at) if p.my_at is None or p.my_at < wall else max(float(at), p.my_at)
            p.hold_until = now + min(max(0.0, moment - wall), MAX_PUNCH_WAIT)
        p.last_cmm = now  # the peer is already asking; no cmm back
        p.path.peer_asked(now)
        self._drain(now)

    def relay_changed(self, up: bool) -> None:
        now = self.clock()
        for p in self._peers.values():
            p.path.relay_up(now) if up else p.path.relay_down(now)
        self._drain(now)

    def endpoint_of(self, wg_key: str) -> Endpoint | None:
        p = self._peers.get(wg_key)
        return p.endpoint if p else None

    def keepalive_on(self, wg_key: str) -> bool:
        p = self._peers.get(wg_key)
        return bool(p and p.keepalive_on)

    @property
    def active(self) -> bool:
        """True when probes can flow (the raw socket opened)."""
        return self._raw is not None

    def status(self, wg_key: str) -> PathStatus | None:
        p = self._peers.get(wg_key)
        return p.path.status if p else None

    # -- internals ---------------------------------------------------------------------------------------

    def _relay_for(self, wg_key: str) -> bool:
        return self.relay_endpoint(wg_key) is not None

    def _classify(self, cands: Iterable[Endpoint]) -> list[Candidate]:
        out = []
        for host, port in cands:
            ip = ipaddress.ip_address(host)
            lan = any(ip in n for n in self.local_nets if n.version == ip.version)
            out.append(Candidate((host, port), CandidateKind.LAN if lan else CandidateKind.PUBLIC))
        return out

    def _candidates_changed(self) -> None:
        cands = self.candidates()
        if cands != self._announced and self.on_candidates is not None:
            self._announced = cands
            asyncio.get_running_loop().create_task(self.on_candidates(cands))
            # peers without a direct path hear our new addresses at once, with a moment to punch
            now = self.clock()
            for p in self._peers.values():
                if p.path.status.path != "direct":
                    p.last_cmm = -1e9
                    p.path.peer_asked(now)
            self._drain(now)

    def _drain(self, now: float) -> None:
        """Carry out every pending decision of every path machine."""
        for p in self._peers.values():
            while (ev := p.path.next_event()) is not None:
                if isinstance(ev, SendProbes):
                    self._probe(p, ev.endpoints, now)
                else:
                    self._effects.put_nowait(ev)
        self._wake.set()

    def _probe(self, p: _Peer, targets: Iterable[Endpoint], now: float) -> None:
        """Send probes, or hold them until the moment agreed with the peer for a new attempt."""
        if self._raw is None:
            return
        targets = tuple(targets)
        if not self._gathered:
            # our own public address is not known yet: a punch now would reach the peer's NAT before we
            # can tell the peer where to answer, so wait (the peer's first probes may then open ours)
            p.held.update(targets)
            p.last_cmm = -1e9
            return
        if p.hold_until is not None and now < p.hold_until:
            p.held.update(targets)
            return
        if p.path.status.path != "direct" and now - p.last_cmm >= CMM_MIN_INTERVAL:
            # A new attempt: tell the peer to probe us too, both at the same wall-clock moment, so that
            # the first probes cross between the two NATs. A probe that arrives before the peer's own
            # has left makes some routers (Linux without an input firewall) create a conntrack entry for
            # themselves, and the peer's flow is then remapped to a random port (DEVELOPERS.md).
            p.last_cmm = now
            p.hold_until = now + PUNCH_DELAY
            p.my_at = time.time() + PUNCH_DELAY
            p.held.update(targets)
            payload = {"type": "cmm", "candidates": self.candidates(), "at": p.my_at}
            asyncio.get_running_loop().create_task(self._signal(p.node_id, payload))
            self._wake.set()
            return
        self._send_probes(p, targets, now)

    def _flush_held(self, now: float) -> None:
        for p in self._peers.values():
            if p.hold_until is not None and now >= p.hold_until:
                p.hold_until = None
                held, p.held = p.held, set()
                self._send_probes(p, sorted(held), now)

    def _send_probes(self, p: _Peer, targets: Iterable[Endpoint], now: float) -> None:
        assert self._raw is not None
        for ep in targets:
            if ":" in ep[0]:
                continue  # the raw socket speaks IPv4 only
            txid = disco.new_txid()
            self._sent[txid] = _Sent(p.wg_key, ep, now)
            try:
                self._raw.send(self.keys.seal(p.node_key, disco.Ping(txid)), ep)
            except (RawPortError, disco.DiscoError) as e:
                log.debug("probe to %s: %s", format_endpoint(ep), e)

    async def _signal(self, node_id: int, payload: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self.send_signal(node_id, payload)

    def _readable(self) -> None:
        assert self._raw is not None
        now = self.clock()
        for _ in range(64):
            got = self._raw.recv()
            if got is None:
                break
            src, data = got
            if stun.looks_like_stun(data):
                self._stun.receive(data, src, now)
                self._stun_results()
            elif disco.looks_like_disco(data):
                self._on_probe(src, data, now)
        self._drain(now)

    def _on_probe(self, src: Endpoint, data: bytes, now: float) -> None:
        assert self._raw is not None
        try:
            sender = disco.sender_key(data)
            p = self._by_node_key.get(sender)
            if p is None:
                return
            msg = self.keys.open(data, sender)
        except disco.DiscoError as e:
            log.debug("probe from %s dropped: %s", format_endpoint(src), e)
            return
        if isinstance(msg, disco.Ping):
            with contextlib.suppress(RawPortError):
                self._raw.send(self.keys.seal(p.node_key, disco.Pong(msg.txid, src)), src)
            p.path.probe_received(src, now)
            return
        sent = self._sent.pop(msg.txid, None)
        if sent is None or sent.peer != p.wg_key:
            return
        p.path.probe_answered(sent.to, src, now - sent.at, now)

    def _stun_results(self) -> None:
        changed = False
        while (ev := self._stun.next_event()) is not None:
            if isinstance(ev, stun.BindingSucceeded):
                if self.nat.reflexive.get(ev.server) != ev.mapped:
                    self.nat.reflexive[ev.server] = ev.mapped
                    changed = True
            else:
                log.debug("STUN %s: %s", format_endpoint(ev.server), ev.reason)
        if self._stun.pending == 0:
            self._stun_idle.set()
        if not self._gathered and self._stun.pending == 0 and self.stun_servers:
            self._gathered_now(self.clock())
        if changed:
            log.info(
                "public address(es): %s (mapping varies by destination: %s)",
                ", ".join(sorted({format_endpoint(m) for m in self.nat.reflexive.values()})),
                self.nat.mapping_varies_by_dest,
            )
            self._candidates_changed()

    def set_portmap(self, protocol: str | None, external: Endpoint | None) -> None:
        self.nat.portmap = protocol
        self.nat.portmapped = external
        self._candidates_changed()

    # -- tasks -----------------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            now = self.clock()
            for p in self._peers.values():
                t = p.path.next_timer()
                if t is not None and t <= now:
                    p.path.handle_timer(now)
            if not self._gathered and self._gather_deadline is not None and now >= self._gather_deadline:
                self._gathered_now(now)  # STUN is slow or absent: go with what we have
            self._flush_held(now)
            self._stun.handle_timer(now)
            if self._raw is not None:
                for data, dst in self._stun.datagrams_to_send(now):
                    with contextlib.suppress(RawPortError):
                        self._raw.send(data, dst)
            self._stun_results()
            self._sent = {k: v for k, v in self._sent.items() if now - v.at < TXID_TTL}
            self._drain(now)
            self._wake.clear()
            timers = [t for p in self._peers.values() if (t := p.path.next_timer()) is not None]
            timers += [p.hold_until for p in self._peers.values() if p.hold_until is not None]
            if not self._gathered and self._gather_deadline is not None:
                timers.append(self._gather_deadline)
            if (t := self._stun.next_timer()) is not None:
                timers.append(t)
            wait = max(0.0, min(timers) - self.clock()) if timers else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(wait, 1.0))

    async def _effect_loop(self) -> None:
        while True:
            ev = await self._effects.get()
            p = self._peers.get(ev.peer)
            if p is None:
                continue
            if isinstance(ev, UseDirect):
                target: Endpoint | None = ev.endpoint
                log.info(
                    "%s: direct via %s (%.1f ms, %s)",
                    p.name,
                    format_endpoint(ev.endpoint),
                    ev.rtt * 1000,
                    ev.reason,
                )
            else:
                target = self.relay_endpoint(p.wg_key)
                log.info("%s: relay (%s)", p.name, ev.reason)
            p.direct = ev.endpoint if isinstance(ev, UseDirect) else None
            if target is not None:
                # Turning keepalive on makes WireGuard start a handshake at once. If both sides did that at
                # the same moment the two initiations would cross, both would end as responders (which may
                # not send data first) and WireGuard would only retry after REKEY_TIMEOUT (5 s). So only
                # the side with the lower WireGuard key starts; the other turns keepalive on once a
                # handshake happened (or after KEEPALIVE_FALLBACK seconds).
                initiate = p.keepalive_on or self.own_key() < p.wg_key
                try:
                    await self.backend.set_endpoint(p.wg_key, target, KEEPALIVE_SECONDS if initiate else None)
                    if p.endpoint is None:
                        p.endpoint_at = self.clock()
                    p.endpoint = target
                    p.keepalive_on = p.keepalive_on or initiate
                except WgError as e:
                    log.warning("%s: setting endpoint %s: %s", p.name, format_endpoint(target), e)

    async def _stun_loop(self) -> None:
        while True:
            now = self.clock()
            for server in self.stun_servers:
                self._stun.query(server, now)
            self._wake.set()
            await asyncio.sleep(STUN_REFRESH)

    async def _handshake_loop(self) -> None:
        while True:
            await asyncio.sleep(HANDSHAKE_POLL)
            try:
                state = await self.backend.state()
            except WgError:
                continue
            wall, mono = time.time(), self.clock()
            for ps in state.peers:
                p = self._peers.get(ps.public_key)
                if p is not None:
                    lh = None if ps.last_handshake is None else ps.last_handshake - wall + mono
                    p.path.handshake(lh, mono)
                    late = p.endpoint_at is not None and mono - p.endpoint_at >= KEEPALIVE_FALLBACK
                    if p.endpoint is not None and not p.keepalive_on and (lh is not None or late):
                        with contextlib.suppress(WgError):
                            await self.backend.set_endpoint(p.wg_key, p.endpoint, KEEPALIVE_SECONDS)
                            p.keepalive_on = True
            self._drain(self.clock())
