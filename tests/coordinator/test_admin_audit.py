"""Admin actions, the hash-chained audit trail, policy, and state surviving a restart."""

from __future__ import annotations

import time

from sqlalchemy import text

from coordinator.core import Core
from meshd.control import ControlClient
from meshd.proto import cert as certfmt
from tests.coordinator.conftest import Coord

ALLOW_ALL = '[[rules]]\nsrc = ["*"]\ndst = ["*:*"]\n'


async def test_admin_actions_are_audited_without_secrets(coord: Coord) -> None:
    key = await coord.user_and_key(tags=["tag:web"])
    _, _e = await coord.enroll("web1", key)
    assert (await coord.admin.post("/admin/nodes/web1/rename", json={"new_name": "web2"})).status_code == 204
    assert (await coord.admin.post("/admin/nodes/web2/tags", json={"tags": ["db"]})).json() == {
        "tags": ["db"]
    }
    assert (await coord.admin.put("/admin/policy", json={"policy": ALLOW_ALL})).status_code == 200
    assert (await coord.admin.post("/admin/nodes/web2/expire")).status_code == 204
    assert (await coord.admin.delete("/admin/nodes/web2")).status_code == 204
    records = (await coord.admin.get("/admin/audit")).json()
    actions = [r["action"] for r in records]
    for expected in (
        "user.created",
        "key.created",
        "key.used",
        "node.enrolled",
        "cert.issued",
        "node.renamed",
        "node.tagged",
        "policy.changed",
        "node.expired",
        "node.removed",
    ):
        assert expected in actions
    dump = str(records)
    assert key not in dump and key[len("meshkey-") + 6 :] not in dump
    verdict = (await coord.admin.get("/admin/audit/verify")).json()
    assert verdict == {"ok": True, "records": len(records), "problem": None}


async def test_policy_get_reports_allow_all_until_set(coord: Coord) -> None:
    assert (await coord.admin.get("/admin/policy")).json() == {"policy": "", "set": False}
    await coord.admin.put("/admin/policy", json={"policy": ALLOW_ALL})
    assert (await coord.admin.get("/admin/policy")).json() == {"policy": ALLOW_ALL, "set": True}
    assert (await coord.admin.put("/admin/policy", json={"policy": "x"})).status_code == 400
    assert (await coord.admin.get("/admin/policy")).json() == {"policy": ALLOW_ALL, "set": True}


async def _verify(coord: Coord) -> dict[str, object]:
    result: dict[str, object] = (await coord.admin.get("/admin/audit/verify")).json()
    return result


async def test_audit_verify_detects_an_edited_record(coord: Coord) -> None:
    await coord.user_and_key()
    async with coord.core.engine.begin() as conn:
        await conn.execute(text("UPDATE audit SET actor = 'mallory' WHERE id = 1"))
    verdict = await _verify(coord)
    assert verdict["ok"] is False and "record 1 was modified" in str(verdict["problem"])


async def test_audit_verify_detects_deleted_records(coord: Coord) -> None:
    await coord.user_and_key("u1")
    await coord.user_and_key("u2")
    async with coord.core.engine.begin() as conn:
        await conn.execute(text("DELETE FROM audit WHERE id = 2"))
    assert "record 2 is missing" in str((await _verify(coord))["problem"])


async def test_audit_verify_detects_a_deleted_tail(coord: Coord) -> None:
    await coord.user_and_key("u1")
    async with coord.core.engine.begin() as conn:
        last = (await conn.execute(text("SELECT max(id) FROM audit"))).scalar()
        await conn.execute(text("DELETE FROM audit WHERE id = :i"), {"i": last})
    assert "deleted" in str((await _verify(coord))["problem"])


async def test_rename_clash_and_unknown_node_are_clear_errors(coord: Coord) -> None:
    key = await coord.user_and_key(reusable=True)
    await coord.enroll("a", key)
    await coord.enroll("b", key)
    r = await coord.admin.post("/admin/nodes/a/rename", json={"new_name": "b"})
    assert r.status_code == 409 and "taken" in r.json()["detail"]
    r = await coord.admin.post("/admin/nodes/a/rename", json={"new_name": "Not Valid"})
    assert r.status_code == 400
    r = await coord.admin.delete("/admin/nodes/zzz")
    assert r.status_code == 404 and "unknown node" in r.json()["detail"]
    r = await coord.admin.post("/admin/users", json={"name": "alice"})
    assert r.status_code == 409 and "already exists" in r.json()["detail"]


async def test_restart_keeps_users_keys_nodes_addresses_and_audit(coord: Coord) -> None:
    key = await coord.user_and_key(reusable=True)
    client, e = await coord.enroll("keeper", key)
    settings = coord.core.settings
    before_nodes = (await coord.admin.get("/admin/nodes")).json()
    before_audit = (await coord.admin.get("/admin/audit")).json()
    await coord.core.stop()
    again = Core(settings)
    await again.start()
    try:
        import httpx

        from coordinator.app import create_admin_app, create_app

        t = httpx.ASGITransport(app=create_app(settings, core=again))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_admin_app(again)), base_url="http://a"
        ) as admin:
            assert [u["name"] for u in (await admin.get("/admin/users")).json()] == ["alice"]
            after_nodes = (await admin.get("/admin/nodes")).json()
            assert [(n["name"], n["ips"]) for n in after_nodes] == [
                (n["name"], n["ips"]) for n in before_nodes
            ]
            assert (await admin.get("/admin/audit")).json()[: len(before_audit)] == before_audit
            assert (await admin.get("/admin/audit/verify")).json()["ok"] is True
            reborn = ControlClient("http://coordinator", client.keys, e.node_id, transport=t)
            cert = await reborn.renew_cert()  # the node's identity and the signing key survived
            certfmt.verify(cert, [e.coordinator_public_key], time.time())
            _, e2 = await Coord(again, coord.api, admin, t).enroll("other", key)  # key still valid
            assert e2.ips[0] != e.ips[0]
            await reborn.aclose()
    finally:
        await again.stop()  # the fixture's stop() of the first core is a no-op by now


async def test_signed_checkpoints_catch_a_recomputed_chain_and_survive_a_signing_key_rotation(
    coord: Coord,
) -> None:
    """SQLite and PostgreSQL: a checkpoint at record 1, at each start/stop and signing-key rotation."""
    from tests.hostile.test_audit_anchor import rewrite_history

    await coord.user_and_key("u1")
    r = await coord.admin.post("/admin/signing-key/rotate", json={"overlap": 0})
    assert r.status_code == 200, r.text
    await coord.user_and_key("u2")
    assert (await _verify(coord))["ok"] is True  # the old key is no longer trusted: the new one signed
    async with coord.core.engine.begin() as conn:
        seqs = [s for (s,) in (await conn.execute(text("SELECT seq FROM audit_checkpoints ORDER BY seq")))]
        rotated = (
            await conn.execute(text("SELECT id FROM audit WHERE action = 'signing_key.rotated'"))
        ).scalar()
    assert seqs == [1, rotated]
    await rewrite_history(coord.core.engine, record=2, actor="mallory")
    problem = str((await _verify(coord))["problem"])
    assert f"checkpoint at record {rotated}" in problem and "recomputed" in problem, problem


async def test_deleting_records_behind_the_newest_checkpoint_is_detected(coord: Coord) -> None:
    await coord.user_and_key("u1")
    await coord.core.checkpoint_audit()
    async with coord.core.engine.begin() as conn:
        last = (await conn.execute(text("SELECT max(id) FROM audit"))).scalar()
        prev = (await conn.execute(text("SELECT hash FROM audit WHERE id = :i"), {"i": last - 1})).scalar()
        await conn.execute(text("DELETE FROM audit WHERE id = :i"), {"i": last})
        await conn.execute(
            text("UPDATE meta SET value = :v WHERE key = 'audit_head'"), {"v": f"{last - 1}:{prev}"}
        )
    assert "were deleted" in str((await _verify(coord))["problem"])
