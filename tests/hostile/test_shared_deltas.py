"""Hostile: an on-path attacker replays a delta the coordinator shared with one view (signed once for a
view token, issue 16) to a node it was not meant for (meshd.proto.netmap, "Shared deltas").

The node side is meshd's ControlClient/MapStream with the keys pinned at enrollment, behind the rewriting
proxy of test_signed_maps. The replayed message is genuine (it verifies for the nodes it was sent to: the
positive control) and starts at exactly the victim's version, so only the view binding can refuse it.
"""

from __future__ import annotations

import json

import pytest

from meshd.control import MapRefused, MapStream
from meshd.proto import netmap
from tests.coordinator.conftest import Coord
from tests.coordinator.test_stream import wait_until
from tests.hostile.test_signed_maps import Proxy, coord, core, db_url, enroll, live, node_client, settings

pytestmark = pytest.mark.hostile
__all__ = ["coord", "core", "db_url", "live", "settings"]  # fixtures used by name

GROUP = """\
[[rules]]
src = ["node:a", "node:b", "node:e"]
dst = ["node:a:22", "node:b:22", "node:e:22"]

[[rules]]
src = ["node:c"]
dst = ["node:e:80"]
"""


def shared_deltas(texts: list[str]) -> list[str]:
    return [t for t in texts if '"view":"' in t and json.loads(t).get("view")]


async def replay_at(stream: MapStream, held: netmap.NetMap, text: str) -> None:
    """The victim resumed from `held` (as meshd does); the attacker answers with `text`."""
    stream.map = held
    await stream.recv(within=5)


async def settled(live: Coord, *streams: MapStream) -> list[netmap.NetMap]:
    """Every stream at the coordinator's version, after the connects' online flags went out."""
    for s in streams:
        await wait_until(s, lambda m: m.self_node.online, 10, "online")
    out = []
    for s in streams:
        out.append(await wait_until(s, lambda m: m.version == live.core.state.version, 10, "settled"))
    return out


async def test_a_delta_shared_with_one_view_is_refused_by_a_node_of_another(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    enrolled = {n: await enroll(live, n, key) for n in ("a", "b", "c", "e")}
    assert (await live.admin.put("/admin/policy", json={"policy": GROUP})).status_code == 200
    e = node_client(live.url, *enrolled["e"])
    async with Proxy(live.url) as proxy, e.stream() as se:
        await settled(live, se)
        clients = {n: node_client(proxy.url, *enrolled[n]) for n in ("b", "c")}
        async with clients["b"].stream() as sb, clients["c"].stream() as sc:
            held_b, held_c = await settled(live, sb, sc)
            assert held_b.view != held_c.view and held_b.version == held_c.version
            await se.send_endpoints(["192.0.2.7:41641"])  # e moves: b's view and c's view both see it
            for s in (sb, sc):
                await wait_until(s, lambda m: any(p.endpoints for p in m.peers), 5, "e's move arrived")
        (for_b,) = shared_deltas(proxy.seen[enrolled["b"][1].node_id])
        assert json.loads(for_b)["delta"]["from_version"] == held_c.version
        c_id = enrolled["c"][1].node_id
        proxy.tamper = lambda node, text: for_b if node == c_id else text
        async with clients["c"].stream(since=held_c.version) as victim:
            with pytest.raises(MapRefused, match="not this node's view"):
                await replay_at(victim, held_c, for_b)
            assert victim.map == held_c, "nothing of the replayed delta was applied"
        assert proxy.tampered >= 1
        # positive control: the replayed message is genuine, and good for the view it was sent to
        check = netmap.decode_server_message(for_b)
        assert isinstance(check, netmap.DeltaMessage)
        netmap.verify(check, enrolled["b"][1].node_id, enrolled["b"][1].trusted_keys, held_b)
        for c in (*clients.values(), e):
            await c.aclose()


async def test_a_delta_shared_with_the_others_is_refused_by_the_node_the_change_touched(
    live: Coord,
) -> None:
    key = await live.user_and_key(reusable=True)
    enrolled = {n: await enroll(live, n, key) for n in ("x", "y")}
    async with Proxy(live.url) as proxy:
        clients = {n: node_client(proxy.url, *enrolled[n]) for n in ("x", "y")}
        async with clients["x"].stream() as sx, clients["y"].stream() as sy:
            held_x, held_y = await settled(live, sx, sy)
            assert held_x.view == held_y.view and held_x.version == held_y.version
            assert (
                await live.admin.post("/admin/nodes/y/rename", json={"new_name": "yy"})
            ).status_code == 204
            await wait_until(sx, lambda m: "yy" in {p.name for p in m.peers}, 5, "x saw the rename")
            await wait_until(sy, lambda m: m.self_node.name == "yy", 5, "y saw its rename")
        # the first shared delta after the settled version (on a loaded machine a later one may follow it)
        (for_x,) = [
            d
            for d in shared_deltas(proxy.seen[enrolled["x"][1].node_id])
            if json.loads(d)["delta"]["from_version"] == held_x.version
        ]
        assert not shared_deltas(proxy.seen[enrolled["y"][1].node_id]), "y's own change came signed for y"
        y_id = enrolled["y"][1].node_id
        proxy.tamper = lambda node, text: for_x if node == y_id else text
        async with clients["y"].stream(since=held_y.version) as victim:
            with pytest.raises(MapRefused, match=f"changes node {y_id}"):
                await replay_at(victim, held_y, for_x)
            assert victim.map == held_y
        proxy.tamper = None
        async with clients["y"].stream(since=held_y.version) as genuine:  # positive control
            genuine.map = held_y
            m = await genuine.next_map(within=5)
            assert m.self_node.name == "yy"
        for c in clients.values():
            await c.aclose()
