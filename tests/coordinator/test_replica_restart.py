"""Streams resume with a delta across a restart of replicas on PostgreSQL (coordinator/resumption.py):
of one replica, of every replica, and after a crash of every replica (whose nodes the delta then says
are offline). SQLite keeps its own rules (tests/coordinator/test_restart_presence.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from sqlalchemy import update

from coordinator import nodes
from coordinator.core import Core
from coordinator.db.models import Replica
from coordinator.settings import Settings
from tests.coordinator.test_restart_presence import add_nodes, started
from tests.eventually import eventually_async

pytestmark = pytest.mark.postgres


@pytest.fixture
def db_url(pg_socket: object) -> str:  # PostgreSQL only
    from tests.coordinator import pg

    return pg.create_database(pg_socket)  # type: ignore[arg-type]


def replica_settings(tmp_path: Path, db_url: str, name: str) -> Settings:
    state = tmp_path / name
    return Settings(
        state_dir=state, database=db_url, coalesce=0.02, listen="127.0.0.1:0", endpoint_write_interval=0
    )


async def crash(core: Core) -> None:
    """The replica's process dies: no clean stop (its presence rows stay), its heartbeat stops."""
    for task in (
        core._janitor,
        core._listener,
        core._retention,
        core._reaper,
        core._heartbeat,
        *core.held_writes,
    ):
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    await core.hub.stop()
    await core.engine.dispose()


async def test_a_restart_of_every_replica_keeps_its_nodes_online_so_reconnects_change_no_map(
    tmp_path: Path, db_url: str
) -> None:
    """The restart storm (issue 16): a clean stop keeps its presence rows for the grace, so the streams
    resume with an empty delta that every view shares, and each reconnect is no map version (before,
    the stop made every node offline and each reconnect online again: a delta naming every node, built
    and signed per stream, O(N^2) for the storm)."""
    one = await started(replica_settings(tmp_path, db_url, "r1"))
    two = await started(replica_settings(tmp_path, db_url, "r2"))
    a, b, c = await add_nodes(one, 3)
    await nodes.set_endpoints(one, a, None, True)
    async with two.transaction():
        pass  # replica 2 catches up with replica 1's writes
    await nodes.set_endpoints(two, b, None, True)
    async with one.transaction():
        pass
    held = one.state.version
    await one.stop()
    await two.stop()

    one = await started(replica_settings(tmp_path, db_url, "r1"))
    two = await started(replica_settings(tmp_path, db_url, "r2"))
    try:
        for core in (one, two):
            assert core.state.peers[a].online and core.state.peers[b].online, "online for the grace"
            assert not core.state.peers[c].online
            pending = core.state.pending_since(held)
            assert pending is not None and not pending.touched and not pending.policy, pending
            assert core.state.shareable(pending, a) and core.state.shareable(pending, b)
        async with one.transaction():
            pass  # replica 1 catches up with replica 2's start
        version = one.state.version
        await nodes.set_endpoints(two, a, None, True)  # the storm: a and b come back, to the other replica
        await nodes.set_endpoints(one, b, None, True)
        async with one.transaction():
            pass
        assert one.state.version == version, "a reconnect within the grace is no map change"
        assert [x.kind for x in one.state.log if x.version > held and x.node_id is not None] == []
    finally:
        await one.stop()
        await two.stop()


async def test_a_node_not_back_within_the_grace_goes_offline(tmp_path: Path, db_url: str) -> None:
    settings = replica_settings(tmp_path, db_url, "r1")
    core = await started(settings)
    a, b = await add_nodes(core, 2)
    await nodes.set_endpoints(core, a, None, True)
    await nodes.set_endpoints(core, b, None, True)
    assert core.presence is not None
    core.presence.grace = 1.0
    held = core.state.version
    await core.stop()

    core = await started(settings)
    try:
        assert core.presence is not None
        core.presence.heartbeat = 0.2
        assert core.state.peers[a].online and core.state.peers[b].online
        await nodes.set_endpoints(core, a, None, True)  # a is back; b is not
        await eventually_async(
            lambda: not core.state.peers[b].online, within=10, what="b offline once the grace passed"
        )
        assert core.state.peers[a].online, "a streams to the restarted replica"
        pending = core.state.pending_since(held)
        assert pending is not None and pending.endpoints == (b,), "one change: b went offline"
    finally:
        await core.stop()


async def test_one_replica_restarts_while_the_other_holds_a_stream(tmp_path: Path, db_url: str) -> None:
    one = await started(replica_settings(tmp_path, db_url, "r1"))
    two = await started(replica_settings(tmp_path, db_url, "r2"))
    try:
        a, _ = await add_nodes(one, 2)
        async with two.transaction():
            pass  # replica 2 catches up with replica 1's writes
        await nodes.set_endpoints(two, a, None, True)  # a streams to replica 2
        async with one.transaction():
            pass  # replica 1 catches up
        held = one.state.version
        await one.stop()
        one = await started(replica_settings(tmp_path, db_url, "r1"))
        assert one.state.peers[a].online, "a streams to the surviving replica"
        pending = one.state.pending_since(held)
        assert pending is not None and not pending.touched, "nothing changed for the nodes: an empty delta"
    finally:
        await one.stop()
        await two.stop()


async def test_after_a_crash_of_every_replica_streams_resume_and_hear_who_went_offline(
    tmp_path: Path, db_url: str
) -> None:
    settings = replica_settings(tmp_path, db_url, "r1")
    core = await started(settings)
    a, b = await add_nodes(core, 2)
    await nodes.set_endpoints(core, a, None, True)
    await nodes.set_endpoints(core, b, ("192.0.2.1:41641",), None)
    held = core.state.version
    assert core.presence is not None
    dead = core.presence.id
    await crash(core)
    core = Core(settings)
    async with core.sessions() as s, s.begin():  # the dead replica's heartbeat is older than the timeout
        await s.execute(update(Replica).where(Replica.id == dead).values(last_seen=Replica.last_seen - 60))
    await core.engine.dispose()

    core = await started(settings)
    try:
        assert not core.state.peers[a].online, "a's stream died with its replica"
        assert core.state.peers[b].endpoints == ("192.0.2.1:41641",)
        pending = core.state.pending_since(held)
        assert pending is not None, "a crash on PostgreSQL needs no saved record: a delta"
        assert pending.endpoints == (a,), "the delta tells a's peers it is offline"
        delta = core.state.delta_for(pending, b)
        assert [(i, online) for i, _, online in delta.endpoints_changed] == [(a, False)]
    finally:
        await core.stop()
