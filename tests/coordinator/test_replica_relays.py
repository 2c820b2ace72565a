"""A relay region per replica (coordinator/replicarelays.py): each replica's embedded relay is a region of
its own, every replica serves every live replica's region, a node's relay home is the same on every
replica and after a restart, and a ticket one replica issues for another's region is valid there."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from coordinator import replicarelays
from coordinator.app import create_admin_app, create_app
from coordinator.core import Core
from coordinator.relay.service import FeedRefused, RelayService
from coordinator.settings import Settings
from meshd.control import ControlClient, Enrollment, NodeKeys
from meshd.proto.netmap import RelayRegion
from tests.coordinator.test_restart_presence import add_nodes, started
from tests.eventually import eventually_async

pytestmark = pytest.mark.postgres


@pytest.fixture
def db_url(pg_socket: object) -> str:  # PostgreSQL only
    from tests.coordinator import pg

    return pg.create_database(pg_socket)  # type: ignore[arg-type]


def replica_settings(tmp_path: Path, db_url: str, n: int, region: int = 0) -> Settings:
    return Settings(
        state_dir=tmp_path / f"r{n}",
        database=db_url,
        coalesce=0.02,
        listen="127.0.0.1:0",
        public_url=f"http://192.0.2.{n}:8080",  # each replica's relay is reached at its own URL
        endpoint_write_interval=0,
        relay_region_id=region,
    )


def regions(core: Core) -> list[tuple[int, str, str]]:
    return [(r.id, r.name, r.url) for r in core.state.relays]


async def caught_up(core: Core) -> None:
    async with core.transaction():
        pass  # a write transaction applies what the other replicas committed


async def test_each_replica_serves_every_replicas_region_and_drops_a_stopped_one(
    tmp_path: Path, db_url: str
) -> None:
    one = await started(replica_settings(tmp_path, db_url, 1))
    two = await started(replica_settings(tmp_path, db_url, 2))
    try:
        both = [(1, "default", "http://192.0.2.1:8080"), (1001, "replica-1001", "http://192.0.2.2:8080")]
        assert regions(two) == both, "the first replica keeps region 1; the next one gets its own"
        await caught_up(one)
        assert regions(one) == both
        held = one.state.version
        await two.stop()
        await caught_up(one)
        assert regions(one) == both[:1], "a stopped replica's region leaves the relay map"
        pending = one.state.pending_since(held)
        assert pending is not None and pending.relays, "the nodes get the new relay map in a delta"
        two = await started(replica_settings(tmp_path, db_url, 2))
        assert two.relay_region is not None and two.relay_region.id == 1001, "stable across a restart"
        await caught_up(one)
        assert regions(one) == both
    finally:
        await two.stop()
        await one.stop()


async def test_a_dead_replicas_region_leaves_the_relay_map_when_it_is_reaped(
    tmp_path: Path, db_url: str
) -> None:
    one = await started(replica_settings(tmp_path, db_url, 1))
    two = await started(replica_settings(tmp_path, db_url, 2))
    try:
        assert one.presence is not None and two._heartbeat is not None
        await caught_up(one)
        assert len(one.state.relays) == 2
        two._heartbeat.cancel()  # replica 2 hangs
        one.presence.timeout, one.presence.heartbeat = 1.0, 0.2
        await eventually_async(
            lambda: len(one.state.relays) == 1, within=10, what="replica 2's region reaped"
        )
        assert one.state.relays[0].id == 1
    finally:
        await two.stop()
        await one.stop()


async def test_a_configured_region_id_held_by_another_live_replica_is_refused(
    tmp_path: Path, db_url: str
) -> None:
    one = await started(replica_settings(tmp_path, db_url, 1, region=7))
    try:
        assert regions(one) == [(7, "replica-7", "http://192.0.2.1:8080")]
        other = Core(replica_settings(tmp_path, db_url, 2, region=7))
        with pytest.raises(replicarelays.RegionConflict, match="relay region 7 is held by the live replica"):
            await other.start()
        await other.engine.dispose()
    finally:
        await one.stop()


async def test_a_nodes_relay_home_is_the_same_on_every_replica_and_after_a_restart(
    tmp_path: Path, db_url: str
) -> None:
    one = await started(replica_settings(tmp_path, db_url, 1))
    two = await started(replica_settings(tmp_path, db_url, 2))
    try:
        (a,) = await add_nodes(one, 1)
        await caught_up(two)
        service = RelayService.for_core(two)
        await service.attach(a, 1001)  # a made replica 2's relay its home
        await eventually_async(lambda: two.state.peers[a].relay_home == 1001, within=5, what="home on 2")
        await caught_up(one)
        assert one.state.peers[a].relay_home == 1001, "replica 1 publishes the home replica 2 saw"
        await one.stop()
        one = await started(replica_settings(tmp_path, db_url, 1))
        assert one.state.peers[a].relay_home == 1001, "and so does it after a restart"
    finally:
        await two.stop()
        await one.stop()


async def test_a_ticket_from_one_replica_for_anothers_region_is_valid_there(
    tmp_path: Path, db_url: str
) -> None:
    s1 = replica_settings(tmp_path, db_url, 1)
    one = await started(s1)
    # replica 2 takes the signing key from replica 1's state dir (shared through the database otherwise)
    s2 = replica_settings(tmp_path, db_url, 2)
    s2.state_dir.mkdir(mode=0o700)
    (s2.state_dir / "signing_key").write_bytes((s1.state_dir / "signing_key").read_bytes())
    two = await started(s2)
    try:
        key = await _user_key(one)
        client = ControlClient(
            "http://one",
            NodeKeys.generate(),
            transport=httpx.ASGITransport(app=create_app(one.settings, core=one)),
        )
        assert isinstance(await client.register("a", auth_key=key), Enrollment)
        grant = await client.relay_ticket(1001)  # replica 2's region, asked of replica 1
        await caught_up(two)
        service = RelayService.for_core(two)
        assert service.hub is not None and service.hub.region_id == 1001
        payload = service.verify(grant.ticket.encode(), time.time())
        assert payload.region_id == 1001
        mine = RelayService.for_core(one).hub
        assert mine is not None and mine.region_id == 1, "replica 1's relay refuses it (another region)"
        await client.aclose()
    finally:
        await two.stop()
        await one.stop()


async def _user_key(core: Core) -> str:
    transport = httpx.ASGITransport(app=create_admin_app(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as admin:
        assert (await admin.post("/admin/users", json={"name": "alice"})).status_code == 201
        r = await admin.post("/admin/keys", json={"user": "alice"})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


async def test_a_standalone_relay_may_not_announce_a_replicas_region(tmp_path: Path, db_url: str) -> None:
    one = await started(replica_settings(tmp_path, db_url, 1))
    two = await started(replica_settings(tmp_path, db_url, 2))
    try:
        await caught_up(one)
        service = RelayService.for_core(one)
        for rid in (1, 1001):  # its own embedded relay's, and the other replica's
            with pytest.raises(FeedRefused, match="replica"):
                await service.add_region(RelayRegion(rid, "evil", "http://198.51.100.9:8443", 0))
        assert regions(one) == regions(two)
    finally:
        await two.stop()
        await one.stop()
