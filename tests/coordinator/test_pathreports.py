"""Path reports (issue 18): a node's signed summary of its path to each peer reaches GET /admin/paths and
the dashboard's nodes page; unsigned or forged reports are refused, peers the node may not see ignored,
nothing is audited, and a removed node's report goes with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from coordinator.settings import Settings
from meshd import pathreport
from meshd.control import ControlClient, ControlError, NodeKeys
from meshd.pathreport import Facts, PathEntry
from meshd.proto import signing
from tests.coordinator.conftest import Coord
from tests.coordinator.test_dashboard import browser, log_in, token_of
from tests.eventually import eventually_async

POLICY = '[[rules]]\nsrc = ["node:a"]\ndst = ["node:b:*"]\n'  # a and b see each other; c sees nobody


async def test_a_signed_report_is_stored_shown_and_never_audited(coord: Coord, settings: Settings) -> None:
    key = await coord.user_and_key(reusable=True)
    (a, ea), (b, eb) = await coord.enroll("a", key), await coord.enroll("b", key)
    before = len((await coord.admin.get("/admin/audit")).json())
    summary = (PathEntry(eb.node_id, "relay", "tcp", 41.3),)
    assert await pathreport.send(a, summary) == 1
    assert await pathreport.send(b, (PathEntry(ea.node_id, "direct", None, 2.0),)) == 1
    got = (await coord.admin.get("/admin/paths")).json()
    assert got["a"]["peers"] == [
        {"name": "b", "path": "relay", "relay_transport": "tcp", "latency_ms": 41.3, "why": None}
    ]
    assert got["b"]["peers"] == [
        {"name": "a", "path": "direct", "relay_transport": None, "latency_ms": 2.0, "why": None}
    ]
    assert abs(got["a"]["reported_at"] - time.time()) < 60
    assert len((await coord.admin.get("/admin/audit")).json()) == before  # telemetry, not a change
    # a read token sees it over the remote admin API
    token = await token_of(coord, "read")
    r = await coord.api.get("/api/v1/admin/paths", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["a"]["peers"][0]["path"] == "relay"
    async with browser(coord, settings) as client:
        await log_in(client, token)
        page = (await client.get("/admin/nodes")).text
        assert 'data-peer="b" data-path="relay"' in page and "b: relay (tcp) 41 ms" in page
        assert 'data-peer="a" data-path="direct"' in page
    # a node removed takes its report with it
    assert (await coord.admin.delete("/admin/nodes/a")).status_code == 204
    got = (await coord.admin.get("/admin/paths")).json()
    assert "a" not in got and got["b"]["peers"] == []  # b's row about a is gone too
    for c in (a, b):
        await c.aclose()


async def test_unsigned_and_forged_reports_are_refused(coord: Coord) -> None:
    a, ea = await coord.enroll("a")
    b, eb = await coord.enroll("b")
    body = {"peers": [{"node": eb.node_id, "path": "direct"}]}
    r = await coord.api.put("/api/v1/paths", json=body)
    assert r.status_code == 401
    # signed with another key in a's name
    forger = coord.client(NodeKeys.generate(), ea.node_id)
    with pytest.raises(ControlError) as refused:
        await pathreport.send(forger, (PathEntry(eb.node_id, "direct"),))
    assert refused.value.status == 401
    # a's genuine signature over a different body

    headers = signing.sign_request(
        a.keys.node_private, str(ea.node_id), "PUT", "/api/v1/paths", b"{}", time.time()
    )
    r = await coord.api.put("/api/v1/paths", content=json.dumps(body), headers=headers)
    assert r.status_code == 401
    for bad in (
        {"peers": [{"node": eb.node_id, "path": "teleport"}]},
        {"peers": [{"node": eb.node_id, "path": "direct", "x": 1}]},
    ):
        with_bad = coord.client(a.keys, ea.node_id)
        try:
            await with_bad._request("PUT", "/api/v1/paths", bad, signer=str(ea.node_id))
            raise AssertionError("a malformed report was accepted")
        except ControlError as e:
            assert e.status == 422
        await with_bad.aclose()
    assert (await coord.admin.get("/admin/paths")).json() == {}
    for c in (a, b, forger):
        await c.aclose()


async def test_peers_the_node_may_not_see_are_ignored(coord: Coord) -> None:
    key = await coord.user_and_key(reusable=True)
    (a, ea), (b, eb), (c, ec) = [await coord.enroll(n, key) for n in ("a", "b", "c")]
    assert (await coord.admin.put("/admin/policy", json={"policy": POLICY})).status_code == 200
    assert (
        await pathreport.send(c, (PathEntry(ea.node_id, "direct"), PathEntry(eb.node_id, "relay", "udp")))
        == 0
    )
    both = (PathEntry(eb.node_id, "direct"), PathEntry(ec.node_id, "direct"), PathEntry(999, "direct"))
    assert await pathreport.send(a, both) == 1
    got = (await coord.admin.get("/admin/paths")).json()
    assert got["c"]["peers"] == [] and [p["name"] for p in got["a"]["peers"]] == ["b"]
    for n in (a, b, c):
        await n.aclose()


async def test_the_report_loop_sends_changes_debounced(coord: Coord, monkeypatch: pytest.MonkeyPatch) -> None:
    key = await coord.user_and_key(reusable=True)
    (a, _), (_, eb) = await coord.enroll("a", key), await coord.enroll("b", key)
    current = [PathEntry(eb.node_id, "relay", "udp", 30.0)]
    sent: list[float] = []
    looks = [0]
    real_send = pathreport.send

    async def counting(
        client: ControlClient, summary: pathreport.Summary, facts: pathreport.Facts | None = None
    ) -> int:
        sent.append(asyncio.get_running_loop().time())
        return await real_send(client, summary, facts)

    async def snapshot() -> pathreport.Summary:
        looks[0] += 1
        return tuple(current)

    async def shown() -> str | None:
        rows = (await coord.admin.get("/admin/paths")).json()
        return str(rows["a"]["peers"][0]["path"]) if "a" in rows else None

    async def is_shown(path: str) -> bool:
        return await shown() == path

    monkeypatch.setattr(pathreport, "send", counting)
    loop = pathreport.run(a, snapshot, debouncer=pathreport.Debouncer(0.5), poll=0.02)
    task = asyncio.create_task(loop)
    try:
        await eventually_async(lambda: is_shown("relay"), within=10)
        current[0] = PathEntry(eb.node_id, "direct", None, 3.0)
        await eventually_async(lambda: is_shown("direct"), within=10)
        seen = looks[0]
        await eventually_async(lambda: looks[0] >= seen + 20, within=10)  # it keeps looking ...
        assert len(sent) == 2 and sent[1] - sent[0] >= 0.5  # ... but sends nothing unchanged
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await a.aclose()


async def test_a_relayed_pair_with_both_sides_facts_says_why(coord: Coord, settings: Settings) -> None:
    key = await coord.user_and_key(reusable=True)
    (a, ea), (b, eb) = await coord.enroll("a", key), await coord.enroll("b", key)
    edm = Facts(udp=True, mapping="EDM", portmap=None)
    assert await pathreport.send(a, (PathEntry(eb.node_id, "relay", "udp", 30.0),), edm) == 1
    # b's facts are not known yet: nothing to explain
    assert await pathreport.send(b, (PathEntry(ea.node_id, "relay", "udp", 30.0),)) == 1
    got = (await coord.admin.get("/admin/paths")).json()
    assert got["a"]["peers"][0]["why"] is None and got["b"]["peers"][0]["why"] is None
    assert await pathreport.send(b, (PathEntry(ea.node_id, "relay", "udp", 30.0),), edm) == 1
    got = (await coord.admin.get("/admin/paths")).json()
    assert got["a"]["peers"][0]["why"] == (
        "a: EDM, b: EDM, neither with port mapping: no passable port pair; "
        "enable UPnP or NAT-PMP on a's or b's router"
    )
    assert got["b"]["peers"][0]["why"].startswith("b: EDM, a: EDM, neither with port mapping")
    async with browser(coord, settings) as client:
        await log_in(client, await token_of(coord, "read"))
        page = (await client.get("/admin/nodes")).text
        assert "(why: a: EDM, b: EDM, neither with port mapping: no passable port pair;" in page
    # a direct path has nothing to explain, whatever the facts
    assert await pathreport.send(a, (PathEntry(eb.node_id, "direct", None, 2.0),), edm) == 1
    assert (await coord.admin.get("/admin/paths")).json()["a"]["peers"][0]["why"] is None
    # a facts object that is not netcheck's vocabulary is refused
    bad = {"peers": [], "facts": {"udp": True, "mapping": "symmetric"}}
    with pytest.raises(ControlError) as refused:
        await a._request("PUT", "/api/v1/paths", bad, signer=str(ea.node_id))
    assert refused.value.status == 422
    for c in (a, b):
        await c.aclose()
