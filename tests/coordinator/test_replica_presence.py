"""Replicas agree on who is online (coordinator/presence.py) and on the signing key after a rotation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from coordinator import sharedsecrets
from coordinator.core import Core
from coordinator.settings import Settings
from meshd.control import ControlClient, Enrollment, NodeKeys
from meshd.proto import netmap
from tests.coordinator.conftest import Coord, served
from tests.coordinator.test_replicas import started
from tests.coordinator.test_stream import next_message, next_signal
from tests.eventually import eventually_async

pytestmark = pytest.mark.postgres


@pytest.fixture
def db_url(pg_socket: object) -> str:  # PostgreSQL only: replicas need a shared server
    from tests.coordinator import pg

    return pg.create_database(pg_socket)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    key = tmp_path / "secrets.key"
    key.write_text(sharedsecrets.new_key_text())
    return Settings(
        state_dir=tmp_path / "state",
        database=db_url,
        coalesce=0.02,
        listen="127.0.0.1:0",
        endpoint_write_interval=0,
        secrets_key_file=key,
    )


@pytest.fixture
async def replica(settings: Settings, live: Coord) -> AsyncIterator[tuple[Core, httpx.AsyncClient]]:
    """A second replica: own state dir (nothing copied: the secrets come from the database)."""
    core = Core(
        Settings(
            state_dir=settings.state_dir.parent / "replica",
            database=settings.database,
            coalesce=0.02,
            listen="127.0.0.1:0",
            endpoint_write_interval=0,
            secrets_key_file=settings.secrets_key_file,
        )
    )
    async with started(core) as pair:
        yield pair


async def online(admin: httpx.AsyncClient, name: str) -> bool:
    r = await admin.get("/admin/nodes")
    assert r.status_code == 200, r.text
    return bool(next(n for n in r.json() if n["name"] == name)["online"])


async def test_a_node_streaming_to_one_replica_is_online_on_the_other(
    live: Coord, replica: tuple[Core, httpx.AsyncClient]
) -> None:
    other, other_admin = replica
    a, _ = await live.enroll("a")
    assert not await online(other_admin, "a")
    async with a.stream() as sa:
        await sa.next_map(within=5)
        await eventually_async(lambda: online(other_admin, "a"), within=5, what="a online on replica 2")
        peer = next(p for p in other.state.peers.values() if p.name == "a")
        assert peer.online  # in replica 2's maps too
    await eventually_async(
        lambda: not_(online(other_admin, "a")),
        within=5,
        what="a offline on replica 2 after its stream closed",
    )
    await a.aclose()


async def not_(x: object) -> bool:
    return not await x  # type: ignore[misc]


async def test_a_dead_replicas_nodes_go_offline_on_the_survivor_within_the_bound(
    live: Coord, replica: tuple[Core, httpx.AsyncClient]
) -> None:
    other, other_admin = replica
    assert live.core.presence is not None and other.presence is not None
    other.presence.timeout, other.presence.heartbeat = 1.5, 0.3  # the bound: timeout + heartbeat
    key = await live.user_and_key(reusable=True)
    a = live.client()
    assert isinstance(await a.register("a", auth_key=key), Enrollment)
    async with a.stream() as sa:
        await sa.next_map(within=5)
        await eventually_async(lambda: online(other_admin, "a"), within=5, what="a online on replica 2")
        # replica 1 "dies": no heartbeat, no clean stop (its stream is still open, as for a hung machine)
        assert live.core._heartbeat is not None
        live.core._heartbeat.cancel()
        died = time.monotonic()
        await eventually_async(
            lambda: not_(online(other_admin, "a")),
            within=10,
            what="a offline once replica 1 missed its heartbeat",
        )
        took = time.monotonic() - died
        assert took < 1.5 + 0.3 + 2.0, took  # the bound plus the database's and the test's latency
        # replica 1 comes back (it was only slow): it finds its row gone and writes its presence again
        await live.core.presence.reap(alive=await live.core.presence.beat())
        await eventually_async(lambda: online(other_admin, "a"), within=5, what="a online again on replica 2")
    await a.aclose()


async def test_a_clean_stop_takes_its_nodes_offline_once_the_grace_has_passed(
    live: Coord, settings: Settings, replica: tuple[Core, httpx.AsyncClient]
) -> None:
    other, other_admin = replica
    assert live.core.presence is not None and other.presence is not None
    live.core.presence.grace = 1.5  # 60 s in production: a restarted replica's nodes are back by then
    other.presence.heartbeat = 0.2
    a, _ = await live.enroll("a")
    async with a.stream() as sa:
        await sa.next_map(within=5)
        await eventually_async(lambda: online(other_admin, "a"), within=5, what="a online on replica 2")
        start = time.monotonic()
        assert live.core._heartbeat is not None
        live.core._heartbeat.cancel()  # as Core.stop does first
        await live.core.hub.stop()
        await live.core.presence.leave()
        assert await online(other_admin, "a"), "online for the grace: a reconnect then changes no map"
        await eventually_async(
            lambda: not_(online(other_admin, "a")), within=5, what="a offline on replica 2"
        )
        assert 1.5 <= time.monotonic() - start < 1.5 + 0.2 + 3
    await a.aclose()


async def test_a_signing_key_rotated_on_one_replica_is_used_by_the_other(
    live: Coord, replica: tuple[Core, httpx.AsyncClient]
) -> None:
    other, _ = replica
    assert other.keys.active_seed == live.core.keys.active_seed
    r = await live.admin.post("/admin/signing-key/rotate", json={})
    assert r.status_code == 200, r.text
    new_id = r.json()["key_id"]
    await eventually_async(
        lambda: other.keys.active_id == new_id, within=5, what="replica 2 took the new key"
    )
    assert other.keys.trusted == live.core.keys.trusted
    # and a replica started now takes the rotated key from the database
    third = Core(
        Settings(
            state_dir=live.core.settings.state_dir.parent / "third",
            database=live.core.settings.database,
            listen="127.0.0.1:0",
            secrets_key_file=live.core.settings.secrets_key_file,
        )
    )
    await third.start()
    try:
        assert third.keys.active_id == new_id and third.keys.trusted == live.core.keys.trusted
    finally:
        await third.stop()


async def test_a_signal_reaches_a_peer_streaming_to_the_other_replica(
    live: Coord, replica: tuple[Core, httpx.AsyncClient]
) -> None:
    other, _ = replica
    key = await live.user_and_key(reusable=True)
    a, _ = await live.enroll("a", key)
    async with served(other, other.settings) as url2:
        b = ControlClient(url2, NodeKeys.generate())
        enrolled = await b.register("b", auth_key=key)
        assert isinstance(enrolled, Enrollment) and a.node_id is not None
        live_a = ControlClient(live.url, a.keys, a.node_id)
        async with live_a.stream() as sa, b.stream() as sb:
            await sa.next_map(within=5)
            await sb.next_map(within=5)
            await eventually_async(
                lambda: (p := live.core.state.peers.get(enrolled.node_id)) is not None and p.online,
                within=5,
                what="b online on replica 1",
            )
            await sa.send_signal(enrolled.node_id, {"kind": "call-me-maybe", "candidates": ["6.0.0.2:41641"]})
            signal = await next_signal(sb, 2.0)
            assert signal.peer == a.node_id and signal.payload["kind"] == "call-me-maybe"
            # too large for a database notification: the sender hears so, nothing is cut
            await sa.send_signal(enrolled.node_id, {"pad": "x" * 7950})
            error = await next_message(sa, netmap.ErrorMessage, 2.0)
            assert "not connected" in error.message
        await live_a.aclose()
        await b.aclose()
    await a.aclose()
