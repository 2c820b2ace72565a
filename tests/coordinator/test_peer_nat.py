"""A node's netcheck facts reach its peers in the network map (issue 15): from its signed path report,
into the ``nat`` field of its record, for the peers the policy lets see it only, and in a delta when
they change (nothing is sent while they hold)."""

from __future__ import annotations

import time

import pytest

from coordinator import pathreports
from meshd import pathreport
from meshd.control import ControlClient
from meshd.pathreport import Facts, PathEntry
from meshd.proto import netmap
from meshd.proto.netmap import PeerNat
from tests.coordinator.conftest import Coord
from tests.eventually import eventually_async

POLICY = '[[rules]]\nsrc = ["node:a"]\ndst = ["node:b:*"]\n'  # a and b see each other; c sees nobody


async def full_map(client: ControlClient) -> netmap.NetMap:
    msg = await client.fetch_map()
    assert isinstance(msg, netmap.MapMessage)
    return msg.map


def nat_of(m: netmap.NetMap, node_id: int) -> PeerNat | None:
    return next((p.nat for p in m.peers if p.node_id == node_id), None)


async def test_a_reported_fact_reaches_the_peers_that_may_see_the_node(coord: Coord) -> None:
    key = await coord.user_and_key(reusable=True)
    (a, ea), (b, eb), (c, _) = [await coord.enroll(n, key) for n in ("a", "b", "c")]
    assert nat_of(await full_map(b), ea.node_id) is None  # nothing reported yet: no field
    # no policy: everyone sees a, and a's facts
    await pathreport.send(a, (), Facts(udp=True, mapping="EDM", portmap=None))
    assert nat_of(await full_map(b), ea.node_id) == PeerNat(True, "EDM", None)
    assert nat_of(await full_map(c), ea.node_id) == PeerNat(True, "EDM", None)
    # with a policy, c no longer sees a at all: neither the record nor its facts
    assert (await coord.admin.put("/admin/policy", json={"policy": POLICY})).status_code == 200
    seen_by_c = await full_map(c)
    assert ea.node_id not in {p.node_id for p in seen_by_c.peers}
    b_map = await full_map(b)
    version = b_map.version
    # a change goes out as a delta to b (a changed peer: its record with the new facts) ...
    await pathreport.send(a, (PathEntry(eb.node_id, "relay", "tcp"),), Facts(False, None, None))
    delta = await b.fetch_map(since=version)
    assert isinstance(delta, netmap.DeltaMessage)
    changed = {p.node_id: p.nat for p in delta.delta.peers_changed}
    assert changed == {ea.node_id: PeerNat(udp=False)}
    # ... and the same facts again change nothing (no map version spent)
    now = coord.core.state.version
    await pathreport.send(a, (PathEntry(eb.node_id, "direct"),), Facts(False, None, None))
    assert coord.core.state.version == now
    # a report without facts (an older meshd) takes them out of the map
    await pathreport.send(a, ())
    assert nat_of(await full_map(b), ea.node_id) is None
    for n in (a, b, c):
        await n.aclose()


async def test_a_node_flipping_its_facts_costs_a_few_map_versions_and_the_last_facts_win(
    coord: Coord, monkeypatch: pytest.MonkeyPatch
) -> None:
    interval = 1.0
    monkeypatch.setattr(pathreports, "FACTS_INTERVAL", interval)
    key = await coord.user_and_key(reusable=True)
    (a, ea), (b, _) = [await coord.enroll(n, key) for n in ("a", "b")]
    before = coord.core.state.version
    flips = [Facts(udp=i % 2 == 0, mapping="EIM", portmap=None) for i in range(20)]
    t0 = time.monotonic()
    for f in flips:  # a hostile (or broken) node: 20 changes as fast as it can
        await pathreport.send(a, (), f)
    # the burst, then one per interval (a slow machine lets a few more turns pass during the loop)
    turns = pathreports.FACTS_BURST + 1 + int((time.monotonic() - t0) / interval)
    assert pathreports.FACTS_BURST <= coord.core.state.version - before <= turns < len(flips)
    want = PeerNat(flips[-1].udp, "EIM", None)

    async def published() -> bool:
        return nat_of(await full_map(b), ea.node_id) == want

    await eventually_async(published, within=10)  # the latest facts go out when their turn comes
    assert coord.core.state.version - before <= turns + 1
    for n in (a, b):
        await n.aclose()
