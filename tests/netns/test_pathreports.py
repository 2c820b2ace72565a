"""Path reports end to end (issue 18): two real meshd find a direct path, and the coordinator's
`GET /admin/paths` (the dashboard's Paths column) shows each one's report of it within seconds."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh

pytestmark = pytest.mark.netns


def test_each_node_reports_its_path_to_the_coordinator(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server())
    alpha = mesh.up(lab.host(nat="public"), "alpha")
    beta = mesh.up(lab.host(nat="public"), "beta")
    mesh.wait_path(alpha, "beta", "direct", within=20)
    mesh.wait_path(beta, "alpha", "direct", within=20)
    transport = httpx.HTTPTransport(uds=str(mesh.coord_dir / "admin.sock"))

    def reported() -> dict[str, Any] | None:
        with httpx.Client(transport=transport, base_url="http://admin", timeout=5) as admin:
            rows: dict[str, Any] = admin.get("/admin/paths").json()
        paths = {(name, p["name"]): p["path"] for name, row in rows.items() for p in row["peers"]}
        return rows if paths == {("alpha", "beta"): "direct", ("beta", "alpha"): "direct"} else None

    rows = eventually(reported, within=15, what="both nodes' direct paths reported")
    assert rows is not None
    peer = rows["alpha"]["peers"][0]
    assert peer["relay_transport"] is None
    assert peer["latency_ms"] is None or 0 <= peer["latency_ms"] < 1000
