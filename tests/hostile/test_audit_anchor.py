"""Hostile: someone with write access to the coordinator's database (not its state dir) rewrites the audit
trail: edits an old record and recomputes every hash after it and the stored head, as docs/security.md
said worked. The signed checkpoints (coordinator/audit.py) must give it away."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.app import create_admin_app
from coordinator.audit import GENESIS, record_hash
from coordinator.core import Core
from coordinator.settings import Settings

pytestmark = pytest.mark.hostile


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    c = Core(Settings(state_dir=tmp_path / "state", listen="127.0.0.1:0"))
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def _verify(core: Core) -> dict[str, object]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_admin_app(core)), base_url="http://admin"
    ) as admin:
        result: dict[str, object] = (await admin.get("/admin/audit/verify")).json()
        return result


async def _admin_actions(core: Core) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_admin_app(core)), base_url="http://admin"
    ) as admin:
        for name in ("alice", "bob", "carol"):
            assert (await admin.post("/admin/users", json={"name": name})).status_code == 201
            r = await admin.post("/admin/keys", json={"user": name})
            assert r.status_code == 201


async def rewrite_history(engine: AsyncEngine, record: int, actor: str) -> None:
    """The attack: change one record, then recompute every later link and hash and the stored head."""
    async with engine.begin() as conn:
        rows = (
            await conn.execute(text("SELECT id, time, actor, action, object, details FROM audit ORDER BY id"))
        ).all()
        prev = GENESIS
        for id_, when, who, action, obj, details in rows:
            who = actor if id_ == record else who
            digest = record_hash(id_, when, who, action, obj, details, prev)
            await conn.execute(
                text("UPDATE audit SET actor = :a, prev_hash = :p, hash = :h WHERE id = :i"),
                {"a": who, "p": prev, "h": digest, "i": id_},
            )
            prev = digest
        await conn.execute(
            text("UPDATE meta SET value = :v WHERE key = 'audit_head'"), {"v": f"{rows[-1][0]}:{prev}"}
        )


async def test_rewriting_an_old_record_and_every_hash_after_it_is_detected(core: Core) -> None:
    await _admin_actions(core)  # records 1..6: user.created, key.created (x3)
    signed = await core.checkpoint_audit()  # what every stop (and start) of the coordinator does
    assert signed == 6
    await _admin_actions_more(core)  # records after the checkpoint
    assert (await _verify(core))["ok"] is True  # positive control: the honest trail verifies

    await rewrite_history(core.engine, record=3, actor="mallory")

    verdict = await _verify(core)
    assert verdict["ok"] is False, "a rewritten audit history went unnoticed"
    assert "checkpoint at record 6" in str(verdict["problem"]), verdict
    assert "changed and the chain recomputed" in str(verdict["problem"])


async def test_forging_the_checkpoint_too_needs_the_signing_key(core: Core) -> None:
    await _admin_actions(core)
    await core.checkpoint_audit()
    await rewrite_history(core.engine, record=2, actor="mallory")
    async with core.engine.begin() as conn:  # and move the checkpoint to the new head, keeping its signature
        head = (await conn.execute(text("SELECT hash FROM audit WHERE id = 6"))).scalar()
        await conn.execute(text("UPDATE audit_checkpoints SET head_hash = :h WHERE seq = 6"), {"h": head})
    verdict = await _verify(core)
    assert verdict["ok"] is False and "checkpoint at record 6" in str(verdict["problem"]), verdict
    assert "bad signature" in str(verdict["problem"])


async def _admin_actions_more(core: Core) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_admin_app(core)), base_url="http://admin"
    ) as admin:
        assert (await admin.post("/admin/users", json={"name": "dave"})).status_code == 201


async def test_deleting_every_checkpoint_before_rewriting_is_detected_by_the_state_dirs_anchor(
    core: Core,
) -> None:
    await _admin_actions(core)
    await core.checkpoint_audit()
    await _admin_actions_more(core)
    async with core.engine.begin() as conn:  # no signature left in the database to contradict the rewrite
        await conn.execute(text("DELETE FROM audit_checkpoints"))
    await rewrite_history(core.engine, record=3, actor="mallory")
    verdict = await _verify(core)
    assert verdict["ok"] is False, "a rewrite after deleting the checkpoints went unnoticed"
    assert "checkpoint at record 6 kept in the state dir" in str(verdict["problem"]), verdict


async def test_rolling_the_database_back_behind_the_newest_checkpoint_is_detected(core: Core) -> None:
    await _admin_actions(core)
    await core.checkpoint_audit()  # record 6
    async with core.engine.begin() as conn:  # back to the state after record 4, as from an old backup
        prev = (await conn.execute(text("SELECT hash FROM audit WHERE id = 4"))).scalar()
        await conn.execute(text("DELETE FROM audit WHERE id > 4"))
        await conn.execute(text("DELETE FROM audit_checkpoints WHERE seq > 4"))
        await conn.execute(text("UPDATE meta SET value = :v WHERE key = 'audit_head'"), {"v": f"4:{prev}"})
    verdict = await _verify(core)
    assert verdict["ok"] is False and "records after 4 were deleted" in str(verdict["problem"]), verdict
