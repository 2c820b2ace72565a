"""The dashboard's relays page: what each relay region carries, and which peer relays serve whom.

Per region: the nodes attached (their ``relay_home``), TCP relay sessions (connections, packets, bytes)
and UDP relay ports (allocations, bytes), and the peer relays attached to it that serve pairs now.
The embedded region's figures are the coordinator's own live counters (Prometheus, the same as its
``/metrics``). A standalone region counts its live traffic in its own ``/metrics``; here it shows what
its feed reported (:mod:`coordinator.relay.usage`: sessions ended since this coordinator started, with
their bytes), and says ``not reported`` for what the feed does not carry (connections now, packets,
UDP allocations now). A peer relay's own byte counts stay on that node (``not reported``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator import peerrelays
from coordinator.core import Core

NOT_REPORTED = "not reported"
Figure = int | str  #: a number, or why there is none


@dataclass(frozen=True, slots=True)
class PeerRelayRow:
    name: str
    region: str  #: the relay region the peer relay node itself is attached to
    pairs: tuple[tuple[str, str], ...]  #: node pairs it serves now


@dataclass(frozen=True, slots=True)
class RegionRow:
    id: int
    name: str
    url: str
    kind: str  #: embedded | standalone
    up: bool
    homed: tuple[str, ...]
    source: str  #: where the traffic figures come from (shown under the table)
    tcp_connections: Figure
    tcp_packets: Figure
    tcp_bytes: Figure
    udp_allocations: Figure
    udp_bytes: Figure
    peer_relays: tuple[PeerRelayRow, ...] = field(default=())


def _sample(core: Core, metric: str, region: str) -> int | None:
    value = core.metrics.registry.get_sample_value(metric, {"region": region})
    return None if value is None else int(value)


def peer_relay_rows(core: Core) -> list[PeerRelayRow]:
    """Every peer relay serving at least one pair now, by name."""
    state = core.state
    regions = {rg.id: rg.name for rg in state.relays}

    def name(node: int) -> str:
        peer = state.peers.get(node)
        return peer.name if peer else f"node {node}"

    rows = []
    for node, pairs in peerrelays.serving(core).items():
        peer = state.peers.get(node)
        home = peer.relay_home if peer else None
        region = regions.get(home, f"region {home}") if home is not None else "-"
        rows.append(PeerRelayRow(name(node), region, tuple((name(a), name(b)) for a, b in pairs)))
    return sorted(rows, key=lambda r: r.name)


def region_rows(core: Core, peer_relays: list[PeerRelayRow]) -> list[RegionRow]:
    state = core.state
    service = getattr(core, "relay_service", None)
    hub = getattr(service, "hub", None)
    feeds = getattr(service, "feed_regions", {})
    usage = getattr(service, "feed_usage", None)
    rows = []
    for rg in state.relays:
        homed = tuple(sorted(p.name for p in state.peers.values() if p.relay_home == rg.id))
        serving = tuple(r for r in peer_relays if r.region == rg.name)
        if hub is not None and hub.region_id == rg.id:
            udp_on = hub.ports is not None
            packets = _sample(core, "relay_packets_total", rg.name)
            nbytes = _sample(core, "relay_bytes_total", rg.name)
            allocations = _sample(core, "relay_udp_allocations", rg.name)
            udp_bytes = _sample(core, "relay_udp_bytes_total", rg.name)
            rows.append(
                RegionRow(
                    rg.id,
                    rg.name,
                    rg.url,
                    "embedded",
                    True,
                    homed,
                    "live counters of this coordinator",
                    len(hub.clients),
                    packets or 0,
                    nbytes or 0,
                    (allocations or 0) if udp_on else "UDP ports off",
                    (udp_bytes or 0) if udp_on else "UDP ports off",
                    serving,
                )
            )
            continue
        tcp = usage.of(rg.name, "tcp") if usage is not None else None
        udp = usage.of(rg.name, "udp") if usage is not None else None
        rows.append(
            RegionRow(
                rg.id,
                rg.name,
                rg.url,
                "standalone",
                rg.id in feeds,
                homed,
                "ended sessions its feed reported since this coordinator started",
                NOT_REPORTED,
                NOT_REPORTED,
                tcp.bytes if tcp is not None else 0,
                NOT_REPORTED,
                udp.bytes if udp is not None else 0,
                serving,
            )
        )
    return rows
