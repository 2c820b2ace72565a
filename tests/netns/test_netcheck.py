"""`meshd netcheck` tells what the network allows, measured for real in the lab."""

from __future__ import annotations

import json

import pytest

from tests.netns.lab import Lab
from tests.netns.mesh import Mesh

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _coordinator(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server(name="coord"))


def _netcheck(mesh: Mesh, node: object) -> dict:  # type: ignore[type-arg]
    return json.loads(mesh.meshd(node, "netcheck", "--json").stdout)  # type: ignore[arg-type,no-any-return]


def test_netcheck_behind_a_upnp_router_edm_nat_and_udp_firewall(lab: Lab, mesh: Mesh) -> None:
    hu, hd, hb = lab.host(nat="upnp"), lab.host(nat="edm"), lab.host(nat="udp-blocked")
    u, d, b = (mesh.up(h, f"n{i}") for i, h in enumerate((hu, hd, hb)))
    r = _netcheck(mesh, u)
    assert r["udp"] is True
    assert r["public_addresses"] == [f"{hu.public_ip}:41641"]
    assert r["mapping_varies_by_dest"] is False
    assert r["portmap"]["natpmp"] and r["portmap"]["pcp"]
    assert r["portmap"]["active"] in ("natpmp", "pcp", "upnp")
    assert r["preferred_relay"] == "default"
    [region] = r["relays"]
    assert region["connected"] and region["latency_ms"] is not None

    r = _netcheck(mesh, d)
    assert r["udp"] is True and r["mapping_varies_by_dest"] is True
    assert len(r["public_addresses"]) == 2
    assert not any(r["portmap"][p] for p in ("upnp", "natpmp", "pcp"))

    r = _netcheck(mesh, b)
    assert r["udp"] is False and r["public_addresses"] == []
    assert r["relays"][0]["connected"], "the relay works over TCP where UDP is blocked"
    human = mesh.meshd(b, "netcheck").stdout
    assert "UDP:" in human and "relay only" in human
