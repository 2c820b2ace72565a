"""Why relayed, on the node (issue 15): two hosts behind endpoint-dependent NATs stay on the relay, and
each one says why itself: its own netcheck facts and the peer's, which reach it in the network map
(from the peer's path report), give the verdict in ``meshd status --json`` (``why``) and in
``meshd ping PEER --explain``."""

from __future__ import annotations

import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh

pytestmark = pytest.mark.netns

EDM_EDM = "EDM, {b}: EDM, neither with port mapping: no passable port pair; enable UPnP or NAT-PMP on"


def test_an_edm_pair_on_the_relay_says_why_on_each_node(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server(name="coord"))
    a = mesh.up(lab.host(nat="edm"), "alpha", wait=False)
    b = mesh.up(lab.host(nat="edm"), "beta", wait=False)
    for n in (a, b):
        mesh.wait_ready(n)
    for x, y in ((a, b), (b, a)):
        mesh.wait_path(x, y.name, "relay", within=30)
        mesh.wait_ping(x, y)

    def why(x: str, y: str) -> str | None:
        peer = mesh.peer(a if x == "alpha" else b, y)
        return None if peer is None else peer.get("why")

    want = {
        ("alpha", "beta"): "alpha: " + EDM_EDM.format(b="beta"),
        ("beta", "alpha"): "beta: " + EDM_EDM.format(b="alpha"),
    }
    for (x, y), start in want.items():
        # both reports (at most 5 s apart) reach the coordinator, and the peer's facts come back in the map
        said = eventually(
            lambda x=x, y=y, start=start: (w := why(x, y)) is not None and w.startswith(start) and w,
            within=40,
            interval=0.3,
            what=f"{x} says why {y} is relayed",
        )
        assert said and said.endswith(f"{x}'s or {y}'s router"), said

    r = mesh.meshd(a, "ping", "beta", "--explain")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("pong from beta (") and " via relay in " in lines[0], r.stdout
    assert lines[1] == f"why relayed: alpha: {EDM_EDM.format(b='beta')} alpha's or beta's router", r.stdout
    assert lines[2:] == [
        "  this node: UDP yes, NAT EDM, port mapping none",
        "  beta: UDP yes, NAT EDM, port mapping none",
    ], r.stdout
