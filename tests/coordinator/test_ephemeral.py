"""Ephemeral nodes through the coordinator's own API (issue 17): a key made with --ephemeral enrolls
nodes that are removed (audited) once offline longer than the timeout, and at once when they leave."""

from __future__ import annotations

import json

from sqlalchemy import select

from coordinator import ephemeral
from coordinator.db.models import AuditRecord
from tests.coordinator.conftest import Coord


async def audit_removals(coord: Coord) -> list[tuple[str, str, dict[str, object]]]:
    async with coord.core.read() as s:
        rows = (await s.execute(select(AuditRecord).where(AuditRecord.action == "node.removed"))).scalars()
        return [(r.actor, r.object, json.loads(r.details)) for r in rows]


async def test_an_ephemeral_node_offline_past_the_timeout_is_removed_and_audited(coord: Coord) -> None:
    key = await coord.user_and_key("ci", ephemeral=True, reusable=True)
    r = await coord.admin.post("/admin/keys", json={"user": "ci"})
    plain_key = r.json()["key"]
    assert r.json()["ephemeral"] is False
    _, runner = await coord.enroll("runner", key)
    await coord.enroll("laptop", plain_key)  # the positive control: never removed
    clock = ephemeral.OfflineClock(timeout=60)
    assert await ephemeral.sweep(coord.core, clock, now=1000) == []  # offline from here on
    assert await ephemeral.sweep(coord.core, clock, now=1059) == []
    assert await ephemeral.sweep(coord.core, clock, now=1060) == ["runner"]
    nodes = {n["name"] for n in (await coord.admin.get("/admin/nodes")).json()}
    assert nodes == {"laptop"}
    assert runner.node_id not in coord.core.state.peers  # revoked: its peers' maps lose it now
    [(actor, obj, details)] = await audit_removals(coord)
    assert (actor, obj) == ("coordinator", "node:runner")
    assert details["ephemeral"] is True and details["reason"] == "offline for 60 s"
    assert details["quarantine_until"]  # its name and address return to the pool after the quarantine
    assert await ephemeral.sweep(coord.core, clock, now=5000) == []  # laptop stays, offline or not


async def test_an_online_ephemeral_node_stays(coord: Coord) -> None:
    key = await coord.user_and_key("ci", ephemeral=True)
    _, runner = await coord.enroll("runner", key)
    coord.core.state.set_endpoints(runner.node_id, None, True)  # what its map stream does
    clock = ephemeral.OfflineClock(timeout=60)
    assert await ephemeral.sweep(coord.core, clock, now=0) == []
    assert await ephemeral.sweep(coord.core, clock, now=600) == []


async def test_leaving_removes_an_ephemeral_node_at_once_and_no_other(coord: Coord) -> None:
    eph_key = await coord.user_and_key("ci", ephemeral=True)
    plain_key = await coord.user_and_key("ci")
    runner_client, runner = await coord.enroll("runner", eph_key)
    laptop_client, laptop = await coord.enroll("laptop", plain_key)
    runner_client.node_id = runner.node_id
    laptop_client.node_id = laptop.node_id
    assert await laptop_client.leave() is False  # `meshd down` on an ordinary node changes nothing
    assert await runner_client.leave() is True
    nodes = {n["name"] for n in (await coord.admin.get("/admin/nodes")).json()}
    assert nodes == {"laptop"}
    [(actor, obj, details)] = await audit_removals(coord)
    assert (actor, obj, details["reason"]) == ("node:runner", "node:runner", "meshd down")
