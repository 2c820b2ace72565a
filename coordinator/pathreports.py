"""The latest path summary each node reported (meshd/pathreport.py), for the dashboard (issue 18).

Memory only, and never audited: it is telemetry the node may restate at any time, not a change to the
network. Bounded: per node at most :data:`MAX_ENTRIES` peers, only peers the node's map shows it
(a node cannot plant rows about nodes it may not see), and a node's report goes with the node (it is
dropped at the next store or read once the node is no longer in the map).

A report may carry the node's own netcheck facts (UDP, NAT mapping, port map); with both sides' facts
:func:`why` explains a relayed pair (meshd/why.py). :func:`publish_facts` also puts them into the node's
record in the network map (``nat``, issue 15), so each peer that may see the node can explain a relayed
path itself (``meshd ping --explain``, ``status --json`` ``why``). Like the reports, they live in this
replica's memory: after a restart peers learn them again from the node's next report that changes them.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass

from coordinator.core import Core
from coordinator.ratelimit import TokenBuckets
from meshd import why as verdicts
from meshd.proto.netmap import PeerNat

MAX_ENTRIES = 512  #: as meshd/pathreport.py MAX_PEERS (a report of that many fits the 64 KiB body limit)
PATHS = ("direct", "relay", "none")
TRANSPORTS = ("udp", "tcp", "peer")


@dataclass(frozen=True, slots=True)
class PeerPath:
    node: int
    path: str
    relay_transport: str | None
    latency_ms: float | None


@dataclass(frozen=True, slots=True)
class Facts:
    """The reporting node's own netcheck facts (meshd.pathreport.Facts); None where it does not know."""

    udp: bool | None
    mapping: str | None  #: "EIM" | "EDM" | "none"
    portmap: str | None  #: "upnp" | "natpmp" | "pcp" while a port map is active
    relay_ms: float | None = None  #: round trip to its home region relay (peer relays, issue 14)
    serve: tuple[str, int, int] | None = None  #: it can be a peer relay: (public address, low, high port)


@dataclass(frozen=True, slots=True)
class Report:
    at: float  #: wall-clock time the coordinator received it
    peers: tuple[PeerPath, ...]
    facts: Facts | None = None  #: absent in reports of older meshd


def why(a: tuple[str, Facts | None], b: tuple[str, Facts | None], path: str) -> str | None:
    """Why ``a``'s path to ``b`` is relayed (meshd/why.py's verdict); None when not relayed or unknown."""
    (na, fa), (nb, fb) = a, b
    if path != "relay" or fa is None or fb is None:
        return None

    def net(name: str, f: Facts) -> verdicts.NetFacts:
        mapping = verdicts.Mapping(f.mapping) if f.mapping is not None else None
        return verdicts.NetFacts(name, f.udp, mapping, f.portmap)

    return verdicts.verdict(net(na, fa), net(nb, fb), direct=False)


def peer_nat(facts: Facts | None) -> PeerNat | None:
    """The map's form of a node's facts (None when it knows nothing)."""
    if facts is None or (facts.udp is None and facts.mapping is None and facts.portmap is None):
        return None
    return PeerNat(facts.udp, facts.mapping, facts.portmap)


FACTS_BURST = 3  #: fact changes a node may publish at once (a starting node learns UDP, mapping, port map)
FACTS_INTERVAL = 10.0  #: seconds per further change: a node flipping its facts costs its peers little


async def publish_facts(core: Core, node_id: int, facts: Facts | None) -> bool:
    """Carry ``node_id``'s facts in the map when they changed (a "changed" change: its peers get the
    record in their next delta); True when they did. Nothing is spent while the facts hold; beyond
    FACTS_BURST changes, one per FACTS_INTERVAL: a change that comes sooner is held, and the node's
    latest facts are published when its turn comes (meshd does not send the same facts again)."""
    nat = peer_nat(facts)
    if node_id not in core.state.peers or core.state.nat.get(node_id) == nat:
        return False
    buckets = _facts_buckets.setdefault(core, TokenBuckets(1 / FACTS_INTERVAL, FACTS_BURST))
    if not buckets.allow(node_id, time.monotonic()):
        held = _held.setdefault(core, {})
        if node_id not in held:  # one held publication per node: it takes the latest facts then
            task = asyncio.create_task(_publish_later(core, node_id), name=f"facts-{node_id}")
            held[node_id] = task
            core.held_writes.add(task)  # cancelled when the coordinator stops

            def done(t: asyncio.Task[None]) -> None:
                core.held_writes.discard(t)
                held.pop(node_id, None)

            task.add_done_callback(done)
        return False
    async with core.transaction() as tx:
        tx.change("changed", node_id)
        tx.on_commit(lambda: core.state.set_nat(node_id, nat))
    return True


async def _publish_later(core: Core, node_id: int) -> None:
    await asyncio.sleep(FACTS_INTERVAL)
    report = reports_of(core).latest.get(node_id)
    _facts_buckets[core].allow(node_id, time.monotonic())  # this turn's token
    nat = peer_nat(report.facts if report is not None else None)
    if node_id in core.state.peers and core.state.nat.get(node_id) != nat:
        async with core.transaction() as tx:
            tx.change("changed", node_id)
            tx.on_commit(lambda: core.state.set_nat(node_id, nat))


_facts_buckets: weakref.WeakKeyDictionary[Core, TokenBuckets[int]] = weakref.WeakKeyDictionary()
_held: weakref.WeakKeyDictionary[Core, dict[int, asyncio.Task[None]]] = weakref.WeakKeyDictionary()


class PathReports:
    def __init__(self) -> None:
        self.latest: dict[int, Report] = {}

    def store(
        self,
        core: Core,
        node_id: int,
        peers: list[PeerPath],
        now: float | None = None,
        facts: Facts | None = None,
    ) -> int:
        """Keep ``peers`` (those ``node_id`` may see, first MAX_ENTRIES) as its latest; answers how many."""
        self.prune(core)
        if node_id not in core.state.peers:
            return 0
        visible = set(core.state.visible_ids(node_id))
        kept: dict[int, PeerPath] = {}
        for p in peers:
            if p.node in visible and len(kept) < MAX_ENTRIES:
                kept[p.node] = p
        self.latest[node_id] = Report(time.time() if now is None else now, tuple(kept.values()), facts)
        return len(kept)

    def prune(self, core: Core) -> None:
        """Forget the reports of nodes that are gone (removed or expired out of the map)."""
        for gone in [n for n in self.latest if n not in core.state.peers]:
            del self.latest[gone]

    def current(self, core: Core) -> dict[int, Report]:
        """The reports, each narrowed to peers its node may see now (the policy may have changed)."""
        self.prune(core)
        out = {}
        for node_id, report in self.latest.items():
            visible = set(core.state.visible_ids(node_id))
            out[node_id] = Report(
                report.at, tuple(p for p in report.peers if p.node in visible), report.facts
            )
        return out


_reports: weakref.WeakKeyDictionary[Core, PathReports] = weakref.WeakKeyDictionary()


def reports_of(core: Core) -> PathReports:
    """The store of this core (shared by the node app, admin.sock and the dashboard)."""
    found = _reports.get(core)
    if found is None:
        found = _reports[core] = PathReports()
    return found
