"""Peer relays (issue 14): which relayed pair goes through which peer relay node, and telling them.

A node an admin turned on (``coordinator nodes relay NAME on``) that reports it can serve (a public
address and a port range, in its path report's facts) is a *peer relay*. Every :data:`TICK` seconds the
planner looks at the path reports and gives each relayed pair (A, B) the closest peer relay R when:

* the policy lets A and B talk, and lets both of them talk to R (R is in both their maps: "using a
  relay node" is talking to it, so the same rules that let a node reach R let it relay through R);
* both A and B report a direct path to R with a measured round trip, and both report their home
  region relay's round trip (``relay_ms``);
* **closer**: rtt(A, R) + rtt(R, B) is below :data:`CLOSER` times rtt(A, region) + rtt(region, B),
  the round trip of the relayed path either way; a pair already on R keeps it while it stays below
  the region's (no flapping between the two at the margin). The nearest such R wins.

The coordinator picks two ports from R's range and one fresh 16-byte secret per side, and sends signed
peer-relay signals (:mod:`meshd.proto.peerrelay`): ``serve`` to R, ``use`` to A and B. A plan that no
longer holds (policy, R turned off or offline, the pair went direct or left) is withdrawn with ``stop``
and ``drop``; live plans are re-sent every :data:`peerrelay.REFRESH` s so a restarted node gets its
own again. Plans live in memory: after a coordinator restart they are made afresh (R replaces pairs
on reassigned ports).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from nacl.signing import SigningKey
from sqlalchemy import select

from coordinator.core import Core
from coordinator.db.models import Node
from coordinator.pathreports import Report, reports_of
from meshd.proto import netmap, peerrelay
from meshd.proto.encoding import b64decode
from meshd.proto.relayport import SECRET_LEN, Assigned

log = logging.getLogger(__name__)

TICK = 2.0
CLOSER = 0.8  #: a new plan needs this fraction of the region relay's round trip or less
MAX_PLANS_PER_RELAY = 64  #: as relayport.PER_NODE: what one peer relay serves at most


@dataclass(frozen=True, slots=True)
class Server:
    """A peer relay that can serve: its node, public address and port range."""

    node: int
    addr: str
    ports: range


@dataclass(frozen=True, slots=True)
class Inputs:
    """What a choice looks at (pure: built from the path reports and the policy)."""

    #: (from, to) -> round trip in ms of a direct path ``from`` reported to ``to``
    direct_ms: Mapping[tuple[int, int], float]
    #: node -> round trip in ms to its home region relay
    region_ms: Mapping[int, float]
    may_talk: Callable[[int, int], bool]


def choose(a: int, b: int, servers: Iterable[Server], inp: Inputs, current: int | None = None) -> int | None:
    """The peer relay for pair (a, b), or None (module docstring: policy, measurements, closer)."""
    if not inp.may_talk(a, b):
        return None
    ra, rb = inp.region_ms.get(a), inp.region_ms.get(b)
    if ra is None or rb is None:
        return None
    region = ra + rb
    best: tuple[float, int] | None = None
    for s in servers:
        r = s.node
        if r in (a, b) or not (inp.may_talk(a, r) and inp.may_talk(b, r)):
            continue
        da, db = inp.direct_ms.get((a, r)), inp.direct_ms.get((b, r))
        if da is None or db is None:
            continue
        via = da + db
        limit = region if r == current else region * CLOSER
        if via < limit and (best is None or (via, r) < best):
            best = (via, r)
    return best[1] if best is not None else None


def relayed_pairs(reports: Mapping[int, Report]) -> set[tuple[int, int]]:
    """Pairs (low id, high id) that at least one side reports relayed."""
    out = set()
    for node, rep in reports.items():
        for p in rep.peers:
            if p.path == "relay" and p.node != node:
                out.add((min(node, p.node), max(node, p.node)))
    return out


def inputs_of(reports: Mapping[int, Report], may_talk: Callable[[int, int], bool]) -> Inputs:
    direct: dict[tuple[int, int], float] = {}
    region: dict[int, float] = {}
    for node, rep in reports.items():
        for p in rep.peers:
            if p.path == "direct" and p.latency_ms is not None:
                direct[(node, p.node)] = p.latency_ms
        if rep.facts is not None and rep.facts.relay_ms is not None:
            region[node] = rep.facts.relay_ms
    return Inputs(direct, region, may_talk)


@dataclass
class Plan:
    relay: int
    a: Assigned
    b: Assigned
    sent: float = 0.0  #: when the signals were last sent (monotonic)


def _capacity(s: Server) -> int:
    """Pairs one peer relay serves at most: its cap, and two ports a pair."""
    return min(MAX_PLANS_PER_RELAY, len(s.ports) // 2)


@dataclass
class Planner:
    """The plans of one coordinator (state; :meth:`step` is pure apart from ``random``)."""

    random: Callable[[int], bytes] = os.urandom
    plans: dict[tuple[int, int], Plan] = field(default_factory=dict)
    _next_port: dict[int, int] = field(default_factory=dict)

    def step(
        self,
        pairs: Iterable[tuple[int, int]],
        servers: Mapping[int, Server],
        inp: Inputs,
        keys: Mapping[int, bytes],
    ) -> tuple[list[tuple[tuple[int, int], Plan]], list[tuple[tuple[int, int], Plan]]]:
        """Plan every relayed pair; returns (made or changed, withdrawn). ``keys``: WireGuard keys."""
        made: list[tuple[tuple[int, int], Plan]] = []
        gone: list[tuple[tuple[int, int], Plan]] = []
        want: dict[tuple[int, int], int] = {}
        load: dict[int, int] = {}
        for pair in sorted(set(pairs)):
            a, b = pair
            if a not in keys or b not in keys:
                continue
            cur = self.plans.get(pair)
            usable = [s for s in servers.values() if load.get(s.node, 0) < _capacity(s)]
            r = choose(a, b, usable, inp, cur.relay if cur is not None else None)
            if r is not None:
                want[pair] = r
                load[r] = load.get(r, 0) + 1
        for pair, plan in list(self.plans.items()):
            r = want.get(pair)
            if r != plan.relay or plan.relay not in servers or plan.a.port not in servers[plan.relay].ports:
                del self.plans[pair]
                gone.append((pair, plan))
        for pair, r in want.items():
            if pair in self.plans:
                continue
            a, b = pair
            pa, pb = self._ports(servers[r])
            plan = Plan(
                r,
                Assigned(keys[a], a, pa, self.random(SECRET_LEN)),
                Assigned(keys[b], b, pb, self.random(SECRET_LEN)),
            )
            self.plans[pair] = plan
            made.append((pair, plan))
        return made, gone

    def _ports(self, s: Server) -> tuple[int, int]:
        """Two ports of ``s`` no plan holds, round robin (a freed port is not reused at once)."""
        used = {p for plan in self.plans.values() if plan.relay == s.node for p in (plan.a.port, plan.b.port)}
        got: list[int] = []
        nxt = self._next_port.get(s.node, s.ports.start)
        for _ in range(len(s.ports)):
            p = nxt if nxt in s.ports else s.ports.start
            nxt = p + 1
            if p not in used:
                got.append(p)
                if len(got) == 2:
                    break
        self._next_port[s.node] = nxt
        if len(got) < 2:  # MAX_PLANS_PER_RELAY keeps this from happening with a sane range
            raise ValueError(f"peer relay {s.node} has no two free ports")
        return got[0], got[1]


# -- the shell --------------------------------------------------------------------------------------------
async def _enabled(core: Core) -> set[int]:
    async with core.read() as s:
        return set((await s.execute(select(Node.id).where(Node.peer_relay.is_(True)))).scalars())


def _servers(core: Core, enabled: set[int], reports: Mapping[int, Report]) -> dict[int, Server]:
    out = {}
    for node in enabled:
        peer = core.state.peers.get(node)
        rep = reports.get(node)
        if peer is None or not peer.online or rep is None or rep.facts is None or rep.facts.serve is None:
            continue
        addr, low, high = rep.facts.serve
        out[node] = Server(node, addr, range(low, high + 1))
    return out


def _may_talk(core: Core) -> Callable[[int, int], bool]:
    compiled = core.state.compiled

    def may(a: int, b: int) -> bool:
        seen = compiled.visible(a)
        return a in core.state.peers and b in core.state.peers and (seen is None or b in seen)

    return may


def _send(core: Core, node: int, body: peerrelay.Body, key: SigningKey) -> None:
    payload = peerrelay.encode(body, node, key)
    core.hub.send_to(node, netmap.encode_server_message(netmap.SignalMessage(0, payload)))


def _tell(core: Core, plan: Plan, servers: Mapping[int, Server], key: SigningKey, on: bool) -> None:
    now = time.time()
    if not on:
        _send(core, plan.relay, peerrelay.Stop(plan.a.key, plan.b.key, now), key)
        _send(core, plan.a.node_id, peerrelay.Drop(plan.b.key, now), key)
        _send(core, plan.b.node_id, peerrelay.Drop(plan.a.key, now), key)
        return
    server = servers[plan.relay]
    relay = core.state.peers[plan.relay]
    _send(core, plan.relay, peerrelay.Serve(plan.a, plan.b, now), key)
    for me, other in ((plan.a, plan.b), (plan.b, plan.a)):
        use = peerrelay.Use(other.key, plan.relay, relay.name, server.addr, me.port, me.secret, now)
        _send(core, me.node_id, use, key)


async def step(core: Core, planner: Planner) -> None:
    """One planning round: plan, withdraw, (re)send."""
    seed = core.state.signing_seed() if core.state.signing_seed is not None else None
    if seed is None:
        return  # unsigned maps (tests of other parts): nodes would refuse unsigned offers anyway
    key = SigningKey(seed)
    reports = reports_of(core).current(core)
    servers = _servers(core, await _enabled(core), reports)
    may = _may_talk(core)
    keys = {i: b64decode(p.wg_public_key, length=32) for i, p in core.state.peers.items()}
    made, gone = planner.step(relayed_pairs(reports), servers, inputs_of(reports, may), keys)
    for pair, plan in gone:
        log.info("peer relay %d no longer for nodes %d and %d", plan.relay, *pair)
        _tell(core, plan, servers, key, on=False)
    for pair, _plan in made:
        log.info("peer relay %d for nodes %d and %d", _plan.relay, *pair)
    now = time.monotonic()
    for plan in planner.plans.values():
        if now - plan.sent >= peerrelay.REFRESH:
            plan.sent = now
            _tell(core, plan, servers, key, on=True)


#: each core's running planner, for the dashboard's view of who serves whom (:func:`serving`)
_planners: weakref.WeakKeyDictionary[Core, Planner] = weakref.WeakKeyDictionary()


def serving(core: Core) -> dict[int, list[tuple[int, int]]]:
    """Peer relay node id -> the node pairs it serves now (empty when no planner runs)."""
    planner = _planners.get(core)
    out: dict[int, list[tuple[int, int]]] = {}
    for pair, plan in sorted(planner.plans.items()) if planner is not None else ():
        out.setdefault(plan.relay, []).append(pair)
    return out


async def run(core: Core) -> None:
    """The planner loop (run it supervised)."""
    planner = _planners[core] = Planner()
    while True:
        await step(core, planner)
        await asyncio.sleep(TICK)
