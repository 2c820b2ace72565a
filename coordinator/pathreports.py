"""The latest path summary each node reported (meshd/pathreport.py), for the dashboard (issue 18).

Memory only, and never audited: it is telemetry the node may restate at any time, not a change to the
network. Bounded: per node at most :data:`MAX_ENTRIES` peers, only peers the node's map shows it
(a node cannot plant rows about nodes it may not see), and a node's report goes with the node (it is
dropped at the next store or read once the node is no longer in the map).

A report may carry the node's own netcheck facts (UDP, NAT mapping, port map); with both sides' facts
:func:`why` explains a relayed pair (meshd/why.py).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

from coordinator.core import Core
from meshd import why as verdicts

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
