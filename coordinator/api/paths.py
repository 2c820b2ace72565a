"""Path reports (issue 18): meshd's signed ``PUT /api/v1/paths`` and the admin's ``GET /admin/paths``."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from coordinator.api.deps import CoreDep, NodeDep
from coordinator.core import Core
from coordinator.pathreports import MAX_ENTRIES, Facts, PeerPath, publish_facts, reports_of, why

router = APIRouter(prefix="/api/v1", tags=["node"])
admin_router = APIRouter(prefix="/admin", tags=["admin"])


class PeerPathIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: int = Field(ge=1)
    path: Literal["direct", "relay", "none"]
    relay_transport: Literal["udp", "tcp", "peer"] | None = None
    latency_ms: float | None = Field(default=None, ge=0, le=600_000)


class ServeIn(BaseModel):
    """A node that can be a peer relay: its public IPv4 address and its UDP relay port range."""

    model_config = ConfigDict(extra="forbid")
    addr: IPv4Address
    low: int = Field(ge=1, le=65535)
    high: int = Field(ge=1, le=65535)

    @model_validator(mode="after")
    def _range(self) -> ServeIn:
        if not self.low < self.high:
            raise ValueError("serve: low must be below high")
        return self


class FactsIn(BaseModel):
    """The node's own netcheck facts (optional: older meshd send none)."""

    model_config = ConfigDict(extra="forbid")
    udp: bool | None = None
    mapping: Literal["EIM", "EDM", "none"] | None = None
    portmap: Literal["upnp", "natpmp", "pcp"] | None = None
    relay_ms: float | None = Field(default=None, ge=0, le=600_000)  #: home region relay round trip
    serve: ServeIn | None = None  #: the node can serve as a peer relay (issue 14)


class PathReportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peers: list[PeerPathIn] = Field(max_length=MAX_ENTRIES)
    facts: FactsIn | None = None


@router.put("/paths")
async def report_paths(body: PathReportIn, node_id: NodeDep, core: CoreDep) -> dict[str, int]:
    """The node's path to each peer; peers it may not see are ignored. Answers how many were kept."""
    peers = [
        PeerPath(p.node, p.path, p.relay_transport if p.path == "relay" else None, p.latency_ms)
        for p in body.peers
    ]
    f = body.facts
    facts = None
    if f is not None:
        serve = (str(f.serve.addr), f.serve.low, f.serve.high) if f.serve is not None else None
        facts = Facts(f.udp, f.mapping, f.portmap, f.relay_ms, serve)
    accepted = reports_of(core).store(core, node_id, peers, facts=facts)
    await publish_facts(core, node_id, facts)  # peers see them in the map (issue 15)
    return {"accepted": accepted}


def path_rows(core: Core) -> dict[str, dict[str, Any]]:
    """Per node name: when it reported and its peers by name (the dashboard's and /admin/paths' view).

    ``why`` explains a relayed path when both sides reported their netcheck facts, else it is null.
    """
    names = {i: peer.name for i, peer in core.state.peers.items()}
    out: dict[str, dict[str, Any]] = {}
    current = reports_of(core).current(core)
    facts = {node_id: report.facts for node_id, report in current.items()}
    for node_id, report in sorted(current.items()):
        if node_id not in names:
            continue
        out[names[node_id]] = {
            "reported_at": report.at,
            "peers": [
                {
                    "name": names.get(p.node, str(p.node)),
                    "path": p.path,
                    "relay_transport": p.relay_transport,
                    "latency_ms": p.latency_ms,
                    "why": why(
                        (names[node_id], report.facts),
                        (names.get(p.node, str(p.node)), facts.get(p.node)),
                        p.path,
                    ),
                }
                for p in sorted(report.peers, key=lambda p: names.get(p.node, ""))
            ],
        }
    return out


@admin_router.get("/paths")
async def list_paths(core: CoreDep) -> dict[str, dict[str, Any]]:
    """The latest path report of each node that sent one (memory only; empty after a restart)."""
    return path_rows(core)
