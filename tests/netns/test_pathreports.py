"""Path reports end to end (issue 18): real meshd find their paths (direct between two public hosts, the
TCP relay to a host whose UDP is blocked), and the coordinator's `GET /admin/paths` (the dashboard's
Paths column) shows each one's report of them within seconds, with why a relayed pair is relayed."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh

pytestmark = pytest.mark.netns


def test_each_node_reports_its_paths_to_the_coordinator(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server())
    alpha = mesh.up(lab.host(nat="public"), "alpha")
    beta = mesh.up(lab.host(nat="public"), "beta")
    gamma = mesh.up(lab.host(nat="udp-blocked"), "gamma")
    mesh.wait_path(alpha, "beta", "direct", within=20)
    mesh.wait_path(beta, "alpha", "direct", within=20)
    mesh.wait_peer(gamma, "alpha")
    mesh.wait_ping(gamma, alpha, within=10)
    transport = httpx.HTTPTransport(uds=str(mesh.coord_dir / "admin.sock"))
    want = {
        ("alpha", "beta"): ("direct", None),
        ("beta", "alpha"): ("direct", None),
        ("alpha", "gamma"): ("relay", "tcp"),
        ("gamma", "alpha"): ("relay", "tcp"),
        ("beta", "gamma"): ("relay", "tcp"),
        ("gamma", "beta"): ("relay", "tcp"),
    }

    def reported() -> dict[str, Any] | None:
        with httpx.Client(transport=transport, base_url="http://admin", timeout=5) as admin:
            rows: dict[str, Any] = admin.get("/admin/paths").json()
        paths = {
            (name, p["name"]): (p["path"], p["relay_transport"])
            for name, row in rows.items()
            for p in row["peers"]
        }
        return rows if paths == want else None

    rows = eventually(reported, within=20, what="every node's paths reported")
    assert rows is not None

    def why_of(node: str, peer: str) -> str | None:
        with httpx.Client(transport=transport, base_url="http://admin", timeout=5) as admin:
            rows = admin.get("/admin/paths").json()
        return next((p["why"] for p in rows[node]["peers"] if p["name"] == peer), None)

    # both sides' netcheck facts reached the coordinator: it says why gamma is relayed (STUN unanswered)
    eventually(
        lambda: "UDP blocked on gamma's network" in (why_of("alpha", "gamma") or ""),
        within=20,
        interval=0.2,
        what="why alpha-gamma is relayed",
    )
    assert "UDP blocked on gamma's network" in (why_of("gamma", "beta") or "")
    assert why_of("alpha", "beta") is None  # direct: nothing to explain
    peer = rows["alpha"]["peers"][0]
    assert peer["latency_ms"] is None or 0 <= peer["latency_ms"] < 1000
