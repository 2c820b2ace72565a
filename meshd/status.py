"""The ``meshd status`` document (DESIGN.md §2) as typed values, its JSON form and a table.

:meth:`Status.to_json` produces exactly the DESIGN.md schema (fields may be added there, never removed
or renamed); :meth:`Status.from_json` reads it back (the CLI gets JSON from the daemon's socket) and
raises :class:`StatusError` for anything that does not fit. :func:`render` draws it with rich.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from meshd.paths import PathKind, PathStatus
from meshd.proto.endpoint import Endpoint, format_endpoint

if TYPE_CHECKING:  # meshd.wg pulls in pyroute2; `meshd status` only draws a table
    from rich.console import Group

    from meshd.wg.model import PeerState

PATHS = ("direct", "relay", "none")


class StatusError(ValueError):
    """A status document that does not follow the schema."""


@dataclass(frozen=True, slots=True)
class NatStatus:
    mapping_varies_by_dest: bool | None = None  #: None: not measured yet
    portmap: str | None = None  #: "upnp", "natpmp", "pcp" or None


@dataclass(frozen=True, slots=True)
class SelfStatus:
    name: str
    ips: tuple[str, ...]
    public_key: str
    interface: str
    backend: str
    endpoints: tuple[str, ...] = ()
    nat: NatStatus = NatStatus()
    relay: str | None = None  #: the relay region in use
    #: why no peer is configured: the inbound rules could not be installed (fail closed); None when fine
    firewall_error: str | None = None
    dns: str | None = None  #: the resolver's address ("IP" or "IP:PORT") while it answers, else None
    routes_advertised: tuple[str, ...] = ()  #: prefixes we offer (subnet router, exit node: issue 17)
    routes_approved: tuple[str, ...] = ()  #: of those, the ones the admin approved (we route them)
    exit_node: str | None = None  #: the peer our internet traffic leaves through, None: our own uplink


@dataclass(frozen=True, slots=True)
class CoordinatorStatus:
    url: str
    connected: bool


@dataclass(frozen=True, slots=True)
class PeerStatus:
    name: str
    ips: tuple[str, ...]
    public_key: str
    path: str  #: one of PATHS
    endpoint: str | None = None  #: the direct endpoint, when path is "direct"
    relay: str | None = None
    latency_ms: float | None = None
    last_handshake: dt.datetime | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    #: how a relayed peer's packets go (issue 14): "udp" (UDP relay ports), "tcp" (the relay session) or
    #: "peer" (a peer relay); None unless path is "relay"
    relay_transport: str | None = None
    routes: tuple[str, ...] = ()  #: approved prefixes this peer carries (issue 17)
    #: why the path is relayed, from both sides' netcheck facts (meshd/why.py, issue 15); None unless
    #: path is "relay"
    why: str | None = None

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            allowed = ", ".join(PATHS)
            raise StatusError(f"peer {self.name!r}: path must be one of {allowed}, not {self.path!r}")


@dataclass(frozen=True, slots=True)
class Status:
    self_: SelfStatus
    coordinator: CoordinatorStatus
    peers: tuple[PeerStatus, ...] = ()

    def to_json(self) -> dict[str, Any]:
        s = self.self_
        return {
            "self": {
                "name": s.name,
                "ips": list(s.ips),
                "public_key": s.public_key,
                "interface": s.interface,
                "backend": s.backend,
                "endpoints": list(s.endpoints),
                "nat": {"mapping_varies_by_dest": s.nat.mapping_varies_by_dest, "portmap": s.nat.portmap},
                "relay": s.relay,
                "firewall_error": s.firewall_error,
                "dns": s.dns,
                "routes": {"advertised": list(s.routes_advertised), "approved": list(s.routes_approved)},
                "exit_node": s.exit_node,
            },
            "coordinator": {"url": self.coordinator.url, "connected": self.coordinator.connected},
            "peers": [
                {
                    "name": p.name,
                    "ips": list(p.ips),
                    "public_key": p.public_key,
                    "path": p.path,
                    "endpoint": p.endpoint,
                    "relay": p.relay,
                    "latency_ms": p.latency_ms,
                    "last_handshake": format_time(p.last_handshake),
                    "rx_bytes": p.rx_bytes,
                    "tx_bytes": p.tx_bytes,
                    "relay_transport": p.relay_transport,
                    "routes": list(p.routes),
                    "why": p.why,
                }
                for p in self.peers
            ],
        }

    @classmethod
    def from_json(cls, doc: Any) -> Status:
        """Read a status document; unknown extra fields are ignored (the schema may grow)."""
        d = _obj(doc, "status")
        s = _obj(d.get("self"), "self")
        nat = _obj(s.get("nat"), "self.nat")
        routes = _obj(s.get("routes", {}), "self.routes")  # issue 17; absent from an older meshd
        c = _obj(d.get("coordinator"), "coordinator")
        peers = d.get("peers")
        if not isinstance(peers, list):
            raise StatusError("peers must be a list")
        return cls(
            self_=SelfStatus(
                name=_val(s, "name", str, "self"),
                ips=_strs(s, "ips", "self"),
                public_key=_val(s, "public_key", str, "self"),
                interface=_val(s, "interface", str, "self"),
                backend=_val(s, "backend", str, "self"),
                endpoints=_strs(s, "endpoints", "self"),
                nat=NatStatus(
                    mapping_varies_by_dest=_opt(nat, "mapping_varies_by_dest", bool, "self.nat"),
                    portmap=_opt(nat, "portmap", str, "self.nat"),
                ),
                relay=_opt(s, "relay", str, "self"),
                firewall_error=_opt(s, "firewall_error", str, "self"),
                dns=_opt(s, "dns", str, "self"),
                routes_advertised=_strs(routes, "advertised", "self.routes") if routes else (),
                routes_approved=_strs(routes, "approved", "self.routes") if routes else (),
                exit_node=_opt(s, "exit_node", str, "self"),
            ),
            coordinator=CoordinatorStatus(
                url=_val(c, "url", str, "coordinator"), connected=_val(c, "connected", bool, "coordinator")
            ),
            peers=tuple(_peer(_obj(p, f"peers[{i}]"), f"peers[{i}]") for i, p in enumerate(peers)),
        )


def format_time(t: dt.datetime | None) -> str | None:
    """RFC 3339 UTC with a Z, whole seconds: ``2026-01-01T00:00:00Z``."""
    if t is None:
        return None
    if t.tzinfo is None:
        raise ValueError("naive datetime: give a timezone")
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, where: str) -> dt.datetime:
    try:
        t = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise StatusError(f"{where}: not a time like 2026-01-01T00:00:00Z: {text!r}") from None
    return t.replace(tzinfo=dt.UTC)


def _obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise StatusError(f"{where} must be an object")
    return v


def _val(d: dict[str, Any], key: str, typ: type, where: str) -> Any:
    v = d.get(key)
    if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
        raise StatusError(f"{where}.{key} must be a {typ.__name__}")
    return v


def _opt(d: dict[str, Any], key: str, typ: type, where: str) -> Any:
    return None if d.get(key) is None else _val(d, key, typ, where)


def _strs(d: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    v = d.get(key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise StatusError(f"{where}.{key} must be a list of strings")
    return tuple(v)


def _num(d: dict[str, Any], key: str, where: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise StatusError(f"{where}.{key} must be a number")
    return float(v)


def _peer(p: dict[str, Any], where: str) -> PeerStatus:
    hs = _opt(p, "last_handshake", str, where)
    return PeerStatus(
        name=_val(p, "name", str, where),
        ips=_strs(p, "ips", where),
        public_key=_val(p, "public_key", str, where),
        path=_val(p, "path", str, where),
        endpoint=_opt(p, "endpoint", str, where),
        relay=_opt(p, "relay", str, where),
        latency_ms=_num(p, "latency_ms", where),
        last_handshake=None if hs is None else parse_time(hs, f"{where}.last_handshake"),
        rx_bytes=_val(p, "rx_bytes", int, where),
        tx_bytes=_val(p, "tx_bytes", int, where),
        relay_transport=_opt(p, "relay_transport", str, where),
        routes=_strs(p, "routes", where) if "routes" in p else (),
        why=_opt(p, "why", str, where),
    )


# --- rendering -----------------------------------------------------------------------------------------


def _ago(t: dt.datetime | None, now: dt.datetime) -> str:
    if t is None:
        return "never"
    s = max(0, int((now - t).total_seconds()))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def render(status: Status, now: dt.datetime | None = None) -> Group:
    """A summary line for this host and one table row per peer."""
    from rich.console import Group  # here: the daemon builds status documents, only the CLI draws them
    from rich.table import Table
    from rich.text import Text

    now = now or dt.datetime.now(dt.UTC)
    s, c = status.self_, status.coordinator
    head = Text()
    head.append(f"{s.name}", style="bold")
    head.append(f"  {' '.join(s.ips)}  {s.interface} ({s.backend})")
    head.append(f"  coordinator {c.url} ")
    head.append("connected" if c.connected else "disconnected", style="green" if c.connected else "red")
    if s.endpoints:
        head.append(f"\nendpoints {', '.join(s.endpoints)}")
    nat = []
    if s.nat.mapping_varies_by_dest is not None:
        nat.append("hard NAT (mapping varies by destination)" if s.nat.mapping_varies_by_dest else "easy NAT")
    if s.nat.portmap:
        nat.append(f"port map via {s.nat.portmap}")
    if s.relay:
        nat.append(f"relay {s.relay}")
    if nat:
        head.append(("\n" if not s.endpoints else "; ") + "; ".join(nat))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("PEER", "IP", "PATH", "ENDPOINT", "LATENCY", "HANDSHAKE", "RX", "TX"):
        table.add_column(col, justify="right" if col in ("LATENCY", "RX", "TX") else "left")
    styles = {"direct": "green", "relay": "yellow", "none": "red"}
    for p in sorted(status.peers, key=lambda p: p.name):
        table.add_row(
            p.name,
            p.ips[0].split("/")[0] if p.ips else "-",
            Text(p.path, style=styles[p.path]),
            p.endpoint or (f"relay {p.relay}" if p.path == "relay" and p.relay else "-"),
            "-" if p.latency_ms is None else f"{p.latency_ms:.1f} ms",
            _ago(p.last_handshake, now),
            _bytes(p.rx_bytes),
            _bytes(p.tx_bytes),
        )
    if not status.peers:
        return Group(head, Text("no peers yet"))
    whys = [Text(f"{p.name} relayed: {p.why}") for p in sorted(status.peers, key=lambda p: p.name) if p.why]
    return Group(head, table, *whys)


# --- builders (pure: the daemon gathers the facts, these shape the documents) ---------------------------


def peer_status(
    *,
    name: str,
    ips: tuple[str, ...],
    public_key: str,
    decision: PathStatus,
    wg: PeerState | None,
    relay: str | None,
    pinged_ms: float | None = None,
    relay_transport: str | None = None,
) -> PeerStatus:
    """One peer's row: the path is the path strategy's decision, never re-derived here.

    ``endpoint`` is shown only for a direct path; the latency is the path machine's probe round trip
    when it has one, else the last ``meshd ping``.
    """
    direct = decision.path == PathKind.DIRECT and decision.endpoint is not None
    hs = wg.last_handshake if wg is not None and wg.last_handshake else None
    return PeerStatus(
        name=name,
        ips=ips,
        public_key=public_key,
        path=str(decision.path),
        relay=relay,
        endpoint=format_endpoint(decision.endpoint) if direct and decision.endpoint else None,
        latency_ms=round(decision.rtt * 1000, 3) if decision.rtt is not None else pinged_ms,
        last_handshake=dt.datetime.fromtimestamp(hs, dt.UTC) if hs else None,
        rx_bytes=wg.rx_bytes if wg is not None else 0,
        tx_bytes=wg.tx_bytes if wg is not None else 0,
        relay_transport=relay_transport if decision.path == PathKind.RELAY else None,
    )


class RegionFacts(Protocol):
    """What netcheck shows of one relay region (meshd.relay.manager.RegionStatus has these)."""

    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def rtt_ms(self) -> float | None: ...
    @property
    def connected(self) -> bool: ...
    @property
    def transport(self) -> str | None: ...


class NatFacts(Protocol):
    """What STUN and the router told us (meshd.nat.strategy.NatInfo has these)."""

    @property
    def reflexive(self) -> Mapping[Endpoint, Endpoint]: ...
    @property
    def portmap(self) -> str | None: ...
    @property
    def portmapped(self) -> Endpoint | None: ...
    @property
    def mapping_varies_by_dest(self) -> bool | None: ...


@dataclass(frozen=True, slots=True)
class _NoNat:
    reflexive: Mapping[Endpoint, Endpoint] = dataclasses.field(default_factory=dict)
    portmap: str | None = None
    portmapped: Endpoint | None = None
    mapping_varies_by_dest: bool | None = None


NO_NAT: NatFacts = _NoNat()  #: before the path strategy runs: nothing learnt yet
NO_PATH = PathStatus(PathKind.NONE, None, None)


def netcheck(
    nat: NatFacts, spoken: Iterable[str], regions: Iterable[RegionFacts], preferred: str | None
) -> dict[str, Any]:
    """The ``meshd netcheck --json`` document (fields: README "netcheck")."""
    said = set(spoken)
    return {
        "udp": bool(nat.reflexive),
        "public_addresses": sorted({format_endpoint(m) for m in nat.reflexive.values()}),
        "mapping_varies_by_dest": nat.mapping_varies_by_dest,
        "portmap": {
            "upnp": "upnp" in said,
            "natpmp": "natpmp" in said,
            "pcp": "pcp" in said,
            "active": nat.portmap,
            "mapped": format_endpoint(nat.portmapped) if nat.portmapped else None,
        },
        "relays": [
            {
                "id": r.id,
                "name": r.name,
                "latency_ms": r.rtt_ms,
                "connected": r.connected,
                "transport": r.transport,
            }
            for r in regions
        ],
        "preferred_relay": preferred,
    }
