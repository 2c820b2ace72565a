"""Online flags across a restart (coordinator/onlineflags.py): a graceful restart lets streams resume with a
delta; a crash falls back to full maps; nodes that do not come back are marked offline after the grace;
the flags of a connect storm are committed together."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import func, select

from coordinator import nodes, onlineflags
from coordinator.core import Core
from coordinator.db.models import MapChange, Meta, User
from coordinator.settings import Settings
from meshd.control import NodeKeys
from meshd.proto.encoding import b64encode


def sqlite_settings(tmp_path: Path) -> Settings:
    url = f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"
    return Settings(state_dir=tmp_path / "state", database=url, coalesce=0.02, listen="127.0.0.1:0")


async def started(settings: Settings) -> Core:
    core = Core(settings)
    await core.start()
    return core


async def add_nodes(core: Core, count: int) -> list[int]:
    async with core.transaction() as tx:
        user = User(name="alice", created_at=0.0)
        tx.session.add(user)
        await tx.session.flush()
        ids = []
        for i in range(count):
            keys = NodeKeys.generate()
            done = await nodes.create_node(
                tx,
                hostname=f"n{i}",
                wg_public_key=b64encode(keys.wg_public),
                node_public_key=b64encode(keys.node_public),
                user_id=user.id,
                tags=(),
                actor="user:alice",
                how="test",
            )
            ids.append(done.node_id)
    return ids


async def test_a_graceful_restart_keeps_online_flags_and_resumes_with_a_delta(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    core = await started(settings)
    a, b = await add_nodes(core, 2)
    await nodes.set_endpoints(core, a, None, True)
    assert core.state.peers[a].online and not core.state.peers[b].online
    held = core.state.version
    await core.stop()

    core = await started(settings)
    try:
        assert core.state.peers[a].online, "a node online at the stop is online after the start"
        assert not core.state.peers[b].online
        pending = core.state.pending_since(held)
        assert pending is not None, "a stream resuming with since=V gets a delta, not a full map"
        assert not pending.touched
        async with core.read() as s:
            assert await s.get(Meta, onlineflags.META_KEY) is None, "the record holds for one start only"
        # a does not come back: after the grace it is marked offline, with one presence change
        before = core.state.version
        await onlineflags.settle(core, frozenset({a}), grace=0)
        assert not core.state.peers[a].online
        assert core.state.version == before + 1
        assert core.state.pending_since(before) is not None
        assert core.state.pending_since(before).endpoints == (a,)  # type: ignore[union-attr]
    finally:
        await core.stop()


async def test_a_node_back_within_the_grace_stays_online_without_a_change(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    core = await started(settings)
    (a,) = await add_nodes(core, 1)
    await nodes.set_endpoints(core, a, None, True)
    await core.stop()
    core = await started(settings)
    try:
        before = core.state.version
        await nodes.set_endpoints(core, a, None, True)  # its stream is back
        assert core.state.version == before, "no presence change for a node that was online already"
    finally:
        await core.stop()


async def test_a_crash_or_a_changed_database_falls_back_to_full_maps(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    core = await started(settings)
    (a,) = await add_nodes(core, 1)
    await nodes.set_endpoints(core, a, None, True)
    held = core.state.version
    await core.stop()
    # something changed the map between the stop and the next start: the record is stale
    async with core.sessions() as s, s.begin():
        last = (await s.execute(select(func.max(MapChange.version)))).scalar_one()
        s.add(MapChange(version=last + 1, kind="changed", node_id=a))
    await core.engine.dispose()
    core = await started(settings)
    try:
        assert not core.state.peers[a].online
        assert core.state.pending_since(held) is None, "streams from before this start get a full map"
    finally:
        # a crash: no stop, so no record for the next start
        await core.hub.stop()
        await core.engine.dispose()
    core = await started(settings)
    try:
        assert not core.state.peers[a].online
        assert core.state.pending_since(held) is None
    finally:
        await core.stop()


async def test_the_flags_of_a_connect_storm_are_committed_together(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    core = await started(settings)
    try:
        ids = await add_nodes(core, 60)
        before = core.state.version
        commits = 0
        real = core.transaction

        def counting():  # type: ignore[no-untyped-def]
            nonlocal commits
            commits += 1
            return real()

        core.transaction = counting  # type: ignore[method-assign]
        await asyncio.gather(*(nodes.set_endpoints(core, i, None, True) for i in ids))
        assert all(core.state.peers[i].online for i in ids)
        assert core.state.version == before + len(ids), "one presence change per node"
        assert commits <= 3, f"{commits} transactions for 60 online flags"
        assert core.state.pending_since(before).endpoints == tuple(ids)  # type: ignore[union-attr]
    finally:
        await core.stop()
