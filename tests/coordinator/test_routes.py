"""Subnet routes and exit nodes through the node and admin APIs (issue 17): advertise, approve, remove,
audit, the map's ``routes``, the policy's routed destinations and the router's inbound rules."""

from __future__ import annotations

from meshd.proto.policy import InboundRule
from tests.coordinator.conftest import Coord
from tests.coordinator.test_stream import enroll_live, wait_until

POLICY = """\
[[rules]]
src = ["node:a"]
dst = ["10.1.0.0/24:22"]
proto = "tcp"

[[rules]]
src = ["node:c"]
dst = ["node:gw:*"]
"""


async def test_advertise_approve_and_remove_reach_the_maps_and_the_audit(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    gw, a = await enroll_live(live, "gw", key), await enroll_live(live, "a", key)
    assert await gw.advertise_routes(["10.1.0.0/24", "10.2.0.0/16"]) == []
    rows = (await live.admin.get("/admin/routes")).json()
    assert [(r["node"], r["prefix"], r["advertised"], r["approved"]) for r in rows] == [
        ("gw", "10.1.0.0/24", True, False),
        ("gw", "10.2.0.0/16", True, False),
    ]
    async with a.stream() as sa:
        m = await sa.next_map(within=5)
        assert next(p for p in m.peers if p.name == "gw").routes == ()
        r = await live.admin.post("/admin/nodes/gw/routes/approve", json={"prefix": "10.1.0.0/24"})
        assert r.status_code == 200 and r.json() == {"approved": ["10.1.0.0/24"]}
        await wait_until(
            sa, lambda m: next(p for p in m.peers if p.name == "gw").routes == ("10.1.0.0/24",), 1.0
        )
        # a prefix approved before it is advertised takes effect when it is
        await live.admin.post("/admin/nodes/gw/routes/approve", json={"prefix": "10.3.0.0/24"})
        assert await gw.advertise_routes(["10.1.0.0/24", "10.3.0.0/24"]) == ["10.1.0.0/24", "10.3.0.0/24"]
        await wait_until(
            sa,
            lambda m: next(p for p in m.peers if p.name == "gw").routes == ("10.1.0.0/24", "10.3.0.0/24"),
            1.0,
        )
        r = await live.admin.post("/admin/nodes/gw/routes/remove", json={"prefix": "10.1.0.0/24"})
        assert r.status_code == 200
        await wait_until(
            sa, lambda m: next(p for p in m.peers if p.name == "gw").routes == ("10.3.0.0/24",), 1.0
        )
    rows = (await live.admin.get("/admin/routes")).json()
    assert {r["prefix"]: (r["advertised"], r["approved"]) for r in rows} == {
        "10.1.0.0/24": (True, False),
        "10.3.0.0/24": (True, True),
    }  # 10.2.0.0/16 was withdrawn and never approved: gone
    actions = [e["action"] for e in (await live.admin.get("/admin/audit")).json()]
    assert actions.count("routes.approved") == 2 and actions.count("routes.removed") == 1
    assert "routes.advertised" in actions
    for c in (gw, a):
        await c.aclose()


async def test_bad_prefixes_and_unknown_nodes_are_4xx(coord: Coord) -> None:
    client, _ = await coord.enroll("gw")
    for bad in ("10.1.0.1/24", "nonsense", "10.0.0.0/33", ""):
        r = await coord.admin.post("/admin/nodes/gw/routes/approve", json={"prefix": bad})
        assert 400 <= r.status_code < 500, (bad, r.text)
    r = await coord.admin.post("/admin/nodes/ghost/routes/approve", json={"prefix": "10.0.0.0/8"})
    assert r.status_code == 404
    r = await coord.admin.post("/admin/nodes/gw/routes/remove", json={"prefix": "10.0.0.0/8"})
    assert r.status_code == 404
    r = await coord.api.put("/api/v1/routes", json={"routes": ["10.0.0.0/8"]})  # unsigned
    assert r.status_code in (401, 403)
    await client.aclose()


async def test_exit_approves_both_default_routes(coord: Coord) -> None:
    client, _ = await coord.enroll("exit1")
    await client.advertise_routes(["0.0.0.0/0", "::/0"])
    r = await coord.admin.post("/admin/nodes/exit1/routes/approve", json={"prefix": "exit"})
    assert r.json() == {"approved": ["0.0.0.0/0", "::/0"]}
    assert coord.core.state.peers[client.node_id or 0].routes == ("0.0.0.0/0", "::/0")  # type: ignore[index]
    await client.aclose()


async def test_the_policy_names_routed_prefixes_and_the_router_enforces_them(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    gw, a, c = [await enroll_live(live, n, key) for n in ("gw", "a", "c")]
    await gw.advertise_routes(["10.1.0.0/16"])
    await live.admin.post("/admin/nodes/gw/routes/approve", json={"prefix": "10.1.0.0/16"})
    assert (await live.admin.put("/admin/policy", json={"policy": POLICY})).status_code == 200
    state = live.core.state
    ids = {p.name: i for i, p in state.peers.items()}
    ip_a = state.peers[ids["a"]].ips
    # a sees gw because the rule's destination overlaps gw's route; the rule names the overlap only
    assert ids["gw"] in state.visible_ids(ids["a"])
    rules = state.inbound(ids["gw"])
    assert InboundRule(ip_a, "tcp", ((22, 22),), ("10.1.0.0/24",)) in rules
    assert not any(r.dst and set(r.sources) & set(state.peers[ids["c"]].ips) for r in rules)
    assert any(not r.dst and set(r.sources) == set(state.peers[ids["c"]].ips) for r in rules)
    # without the approval the destination names nothing and a no longer sees gw
    await live.admin.post("/admin/nodes/gw/routes/remove", json={"prefix": "10.1.0.0/16"})
    assert ids["gw"] not in state.visible_ids(ids["a"])
    assert not any(r.dst for r in state.inbound(ids["gw"]))
    for client in (gw, a, c):
        await client.aclose()
