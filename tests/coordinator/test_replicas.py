"""Two coordinator replicas on one PostgreSQL database: writes never collide and streams hear each other."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from coordinator.app import create_admin_app, create_app
from coordinator.core import Core
from coordinator.settings import Settings
from meshd.control import ControlClient, Enrollment, NodeKeys
from tests.coordinator.conftest import Coord
from tests.coordinator.test_stream import names, wait_until
from tests.eventually import eventually_async

pytestmark = pytest.mark.postgres


@pytest.fixture
def db_url(pg_socket: object) -> str:  # PostgreSQL only: replicas need a shared server
    from tests.coordinator import pg

    return pg.create_database(pg_socket)  # type: ignore[arg-type]


@pytest.fixture
async def replica(settings: Settings, live: Coord) -> AsyncIterator[tuple[Core, httpx.AsyncClient]]:
    """A second coordinator process-equivalent (own Core, own state) sharing the database and signing key."""
    import shutil

    state = settings.state_dir.parent / "replica"
    state.mkdir()
    shutil.copy(settings.state_dir / "signing_key", state / "signing_key")
    core = Core(Settings(state_dir=state, database=settings.database, coalesce=0.02, listen="127.0.0.1:0"))
    async with started(core) as pair:
        yield pair


@asynccontextmanager
async def started(core: Core) -> AsyncIterator[tuple[Core, httpx.AsyncClient]]:
    """`core` started, with an admin API client; stopped at the end."""
    await core.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_admin_app(core)), base_url="http://replica"
        ) as admin:
            yield core, admin
    finally:
        await core.stop()


async def test_a_change_on_one_replica_reaches_streams_on_the_other(
    live: Coord, replica: tuple[Core, httpx.AsyncClient]
) -> None:
    other, other_admin = replica
    key = await live.user_and_key(reusable=True)
    a = ControlClient(live.url, NodeKeys.generate())
    assert isinstance(await a.register("a", auth_key=key), Enrollment)
    async with a.stream() as sa:
        await sa.next_map(within=5)
        start = time.monotonic()
        other_client = ControlClient(
            "http://replica",
            NodeKeys.generate(),
            transport=httpx.ASGITransport(app=create_app(other.settings, core=other)),
        )
        assert isinstance(await other_client.register("b", auth_key=key), Enrollment)
        await wait_until(sa, lambda m: "b" in names(m), 1.0)
        r = await other_admin.post("/admin/nodes/b/rename", json={"new_name": "bee"})
        assert r.status_code == 204
        await wait_until(sa, lambda m: "bee" in names(m), 1.0)
        assert (await other_admin.delete("/admin/nodes/bee")).status_code == 204
        await wait_until(sa, lambda m: not m.peers, 1.0)
        assert time.monotonic() - start < 3.0
        await other_client.aclose()
    await a.aclose()


async def test_concurrent_enrollments_on_two_replicas_get_distinct_versions_and_addresses(
    live: Coord, replica: tuple[Core, httpx.AsyncClient]
) -> None:
    other, other_admin = replica
    key = await live.user_and_key(reusable=True)
    t2 = httpx.ASGITransport(app=create_app(other.settings, core=other))
    clients = [live.client() for _ in range(6)] + [
        ControlClient("http://replica", NodeKeys.generate(), transport=t2) for _ in range(6)
    ]
    results = await asyncio.gather(*(c.register(f"n{i}", auth_key=key) for i, c in enumerate(clients)))
    ips = [ip for r in results if isinstance(r, Enrollment) for ip in r.ips]
    assert len(ips) == 24 and len(set(ips)) == 24
    assert len({r.name for r in results if isinstance(r, Enrollment)}) == 12
    verdict = (await other_admin.get("/admin/audit/verify")).json()
    assert verdict["ok"] is True, verdict
    # each replica learns the other's writes through the database's notifications
    await eventually_async(
        lambda: (
            other.state.version == live.core.state.version
            and set(other.state.peers) == set(live.core.state.peers)
        ),
        within=5,
        what="both replicas have the same map version and peers",
    )
    assert len(live.core.state.peers) == 12
