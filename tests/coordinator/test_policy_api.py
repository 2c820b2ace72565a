"""Policy through the admin API and the map stream: validation, audit, filtered maps, inbound rules."""

from __future__ import annotations

import asyncio
import time

from meshd.proto import netmap
from meshd.proto.policy import ALLOW_ALL, InboundRule
from tests.coordinator.conftest import Coord
from tests.coordinator.test_stream import enroll_live, names, wait_until

A_TO_B_SSH = """\
[[rules]]
src = ["node:a"]
dst = ["node:b:22"]
proto = "tcp"

[[tests]]
src = "node:a"
accept = ["node:b:22"]
deny = ["node:c:22", "node:b:5432"]
"""


async def test_a_bad_policy_is_rejected_with_lines_and_the_old_one_stays(coord: Coord) -> None:
    await coord.user_and_key()
    good = '[[rules]]\nsrc = ["*"]\ndst = ["*:*"]\n'
    assert (await coord.admin.put("/admin/policy", json={"policy": good})).status_code == 200
    r = await coord.admin.put(
        "/admin/policy", json={"policy": '[[rules]]\nsrc = ["group:x"]\ndst = ["user:bob:22"]\n'}
    )
    assert r.status_code == 400
    assert r.json()["detail"].splitlines() == [
        "policy rejected (the stored policy is unchanged):",
        "line 2: unknown group 'group:x'",
        "line 3: unknown user 'bob'",
    ]
    failing = good + '[[tests]]\nsrc = "user:alice"\ndeny = ["user:alice:22"]\n'
    r = await coord.admin.put("/admin/policy", json={"policy": failing})
    assert (
        r.status_code == 400
        and "line 6: test failed: user:alice may reach user:alice:22 (tcp)" in r.json()["detail"]
    )
    assert (await coord.admin.get("/admin/policy")).json() == {"policy": good, "set": True}
    changes = [a for a in (await coord.admin.get("/admin/audit")).json() if a["action"] == "policy.changed"]
    assert len(changes) == 1


async def test_maps_carry_only_allowed_peers_and_changes_arrive_within_one_second(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    a, b, c = [await enroll_live(live, n, key) for n in "abc"]
    async with a.stream() as sa, b.stream() as sb, c.stream() as sc:
        for s, others in ((sa, {"b", "c"}), (sb, {"a", "c"}), (sc, {"a", "b"})):
            m = await s.next_map(within=5)
            assert names(m) == others and m.inbound == ALLOW_ALL
        start = time.monotonic()
        r = await live.admin.put("/admin/policy", json={"policy": A_TO_B_SSH})
        assert r.status_code == 200, r.text
        ma, mb, mc = await asyncio.gather(
            wait_until(sa, lambda m: names(m) == {"b"}, 1.0),
            wait_until(sb, lambda m: names(m) == {"a"}, 1.0),
            wait_until(sc, lambda m: names(m) == set(), 1.0),
        )
        assert time.monotonic() - start < 1.0
        a_ips = next(p for p in mb.peers if p.name == "a").ips
        assert mb.inbound == (InboundRule(a_ips, "tcp", ((22, 22),)),)
        assert ma.inbound == () and mc.inbound == ()
        # a newcomer is seen only by those allowed to talk to it: its join reaches every stream (as an
        # empty delta where it is hidden), so once a stream is at the join's version its map is final;
        # a full map fetched now must agree
        before = live.core.state.version
        d = await enroll_live(live, "d", key)
        joined = live.core.state.version
        assert joined > before
        for s, client, expected in ((sa, a, {"b"}), (sb, b, {"a"}), (sc, c, set())):
            m = await wait_until(s, lambda m: m.version >= joined, 1.0, "the join reached the stream")
            assert names(m) == expected
            full = await client.fetch_map()
            assert isinstance(full, netmap.MapMessage) and names(full.map) == expected
        d_view = await d.fetch_map()
        assert isinstance(d_view, netmap.MapMessage) and names(d_view.map) == set()
        # clearing the policy brings everyone back
        await live.admin.put("/admin/policy", json={"policy": ""})
        await wait_until(sc, lambda m: names(m) == {"a", "b", "d"} and m.inbound == ALLOW_ALL, 1.0)
    for client in (a, b, c, d):
        await client.aclose()


async def test_a_full_map_after_reconnect_is_filtered_too(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    a, b, c = [await enroll_live(live, n, key) for n in "abc"]
    assert (await live.admin.put("/admin/policy", json={"policy": A_TO_B_SSH})).status_code == 200
    async with c.stream() as sc, a.stream() as sa:
        assert names(await sc.next_map(within=5)) == set()
        assert names(await sa.next_map(within=5)) == {"b"}
    for client in (a, b, c):
        await client.aclose()


async def test_retagging_a_node_changes_who_sees_it(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    a, b = [await enroll_live(live, n, key) for n in "ab"]
    text = '[tag_owners]\n"tag:web" = ["alice"]\n[[rules]]\nsrc = ["*"]\ndst = ["tag:web:443"]\n'
    assert (await live.admin.put("/admin/policy", json={"policy": text})).status_code == 200
    async with a.stream() as sa, b.stream() as sb:
        assert names(await sa.next_map(within=5)) == set()
        await sb.next_map(within=5)
        assert (await live.admin.post("/admin/nodes/b/tags", json={"tags": ["tag:web"]})).status_code == 200
        await wait_until(sa, lambda m: names(m) == {"b"}, 1.0)
        mb = await wait_until(sb, lambda m: names(m) == {"a"}, 1.0)
        assert [r.ports for r in mb.inbound] == [((443, 443),)]
        assert mb.self_node.tags == ("tag:web",)
        assert (await live.admin.post("/admin/nodes/b/tags", json={"tags": []})).status_code == 200
        await wait_until(sa, lambda m: names(m) == set(), 1.0)
    for client in (a, b):
        await client.aclose()


async def test_with_a_policy_only_tag_owners_may_put_a_tag_on_a_key(coord: Coord) -> None:
    await coord.user_and_key("alice")
    await coord.user_and_key("bob")
    text = '[groups]\nops = ["alice"]\n[tag_owners]\n"tag:db" = ["group:ops"]\n'
    assert (await coord.admin.put("/admin/policy", json={"policy": text})).status_code == 200
    ok = await coord.admin.post("/admin/keys", json={"user": "alice", "tags": ["tag:db"]})
    assert ok.status_code == 201, ok.text
    no = await coord.admin.post("/admin/keys", json={"user": "bob", "tags": ["tag:db"]})
    assert no.status_code == 403
    assert (
        no.json()["detail"]
        == "user 'bob' may not assign 'tag:db': the policy's [tag_owners] does not allow it"
    )
    undeclared = await coord.admin.post("/admin/keys", json={"user": "alice", "tags": ["web"]})
    assert undeclared.status_code == 403
    # the key's tags are the enrolled node's tags
    await coord.enroll("db1", ok.json()["key"])
    nodes = (await coord.admin.get("/admin/nodes")).json()
    assert next(n for n in nodes if n["name"] == "db1")["tags"] == ["tag:db"]
