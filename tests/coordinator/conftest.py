"""Coordinator API test fixtures: a core on SQLite or the test PostgreSQL, ASGI clients, a live server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from coordinator.app import create_admin_app, create_app
from coordinator.core import Core
from coordinator.settings import Settings
from meshd.control import ControlClient, Enrollment, NodeKeys
from tests.coordinator import pg
from tests.eventually import eventually_async


@pytest.fixture(scope="session")
def pg_socket() -> Iterator[Path]:
    if not pg.available():
        pytest.skip("needs root and Debian's postgresql package")
    with pg.postgres_server() as sock:
        yield sock


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"
    sock: Path = request.getfixturevalue("pg_socket")
    return pg.create_database(sock)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(state_dir=tmp_path / "state", database=db_url, coalesce=0.02, listen="127.0.0.1:0")


@pytest.fixture
async def core(settings: Settings) -> AsyncIterator[Core]:
    c = Core(settings)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@dataclass
class Coord:
    """The coordinator under test: its core, node API client and admin API client."""

    core: Core
    api: httpx.AsyncClient
    admin: httpx.AsyncClient
    transport: httpx.ASGITransport
    url: str = "http://coordinator"

    async def user_and_key(self, user: str = "alice", **kw: object) -> str:
        r = await self.admin.post("/admin/users", json={"name": user})
        assert r.status_code in (201, 409), r.text
        r = await self.admin.post("/admin/keys", json={"user": user, **kw})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    def client(self, keys: NodeKeys | None = None, node_id: int | None = None) -> ControlClient:
        return ControlClient(self.url, keys or NodeKeys.generate(), node_id, transport=self.transport)

    async def enroll(self, hostname: str, key: str | None = None) -> tuple[ControlClient, Enrollment]:
        key = key or await self.user_and_key()
        client = self.client()
        result = await client.register(hostname, auth_key=key)
        assert isinstance(result, Enrollment)
        return client, result


@pytest.fixture
async def coord(core: Core, settings: Settings) -> AsyncIterator[Coord]:
    transport = httpx.ASGITransport(app=create_app(settings, core=core))
    admin_transport = httpx.ASGITransport(app=create_admin_app(core))
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://coordinator") as api,
        httpx.AsyncClient(transport=admin_transport, base_url="http://admin") as admin,
    ):
        yield Coord(core, api, admin, transport)


@pytest.fixture
async def live(coord: Coord, settings: Settings) -> AsyncIterator[Coord]:
    """The same coordinator also served by uvicorn on a random loopback port (for WebSocket tests)."""
    async with served(coord.core, settings) as url:
        yield Coord(coord.core, coord.api, coord.admin, coord.transport, url)


@contextlib.asynccontextmanager
async def served(core: Core, settings: Settings) -> AsyncIterator[str]:
    """`core`'s node API served by uvicorn on a random loopback port; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY on accept
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, core=core), log_level="warning", lifespan="off")
    )
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually_async(lambda: server.started, within=5, what="uvicorn serves the live coordinator")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await core.hub.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()
