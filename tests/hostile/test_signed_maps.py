"""Hostile: an on-path attacker between a node and the coordinator rewrites or replays map messages
(issue 12, "Signed maps").

With the documented plain-HTTP default, anyone on the path could rewrite a delta: open the node's inbound
firewall (an allow-all rule), send its relay and STUN traffic to a URL of theirs, swap endpoints or a
peer's node key. Every map and delta is now signed for its recipient by the coordinator signing key meshd
pinned at enrollment (meshd.proto.netmap). The attacker here is a TCP proxy on loopback in front of a live
coordinator that rewrites WebSocket frames from the coordinator; the node side is what meshd runs: a real
ControlClient and MapStream under a ControlSession, with the keys pinned at enrollment.

Each attack has a positive control (the same set-up without the attack delivers the map), and the
attacker counts what it changed, so a test cannot pass because the attack never happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from meshd import session as session_mod
from meshd.control import ControlClient, Enrollment, MapRefused, NodeKeys
from meshd.proto import netmap
from meshd.proto.policy import ALLOW_ALL, InboundRule
from meshd.session import ControlSession
from tests.coordinator import conftest as coordinator_fixtures
from tests.coordinator.conftest import Coord
from tests.coordinator.test_stream import wait_until
from tests.eventually import eventually_async

pytestmark = pytest.mark.hostile

# the live coordinator of tests/coordinator (uvicorn on a random loopback port)
settings, core, coord, live = (
    coordinator_fixtures.settings,
    coordinator_fixtures.core,
    coordinator_fixtures.coord,
    coordinator_fixtures.live,
)

EVIL_RELAY = "http://6.6.6.6:8080"
ALLOW_EVERYTHING = [{"src": ["0.0.0.0/0", "::/0"], "proto": "any", "ports": []}]

A_TO_B_SSH = """\
[[rules]]
src = ["node:a"]
dst = ["node:b:22"]
proto = "tcp"
"""
A_TO_B_SSH_AND_WEB = A_TO_B_SSH.replace('"node:b:22"', '"node:b:22,80"')


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: the attack is on the wire, the database does not matter."""
    return f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"


# ---------------------------------------------------------------------------------------------- the attacker

Tamper = Callable[[int, str], str]  #: (node id of the connection, text message) -> what the node gets


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of the coordinator. Requests pass unchanged; after a WebSocket
    upgrade, every text frame from the coordinator goes through `tamper` (if set) before the node sees it.
    `seen[node]` keeps the genuine texts (for replays), `tampered` counts frames it changed."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.tamper: Tamper | None = None
        self.tampered = 0
        self.seen: dict[int, list[str]] = {}
        self.paths: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            sr, sw = await asyncio.open_connection(*self.upstream)
            head = await cr.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            self.paths.append(lines[0].split(" ")[1])
            node = next(
                (int(v) for k, _, v in (ln.partition(": ") for ln in lines) if k.lower() == "x-mesh-node"),
                -1,
            )
            sw.write(head)
            up = asyncio.create_task(_pipe(cr, sw))
            try:
                await self._downstream(sr, cw, node)
            finally:
                up.cancel()
                await asyncio.gather(up, return_exceptions=True)
                sw.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            cw.close()
            self._tasks.discard(task)

    async def _downstream(self, sr: asyncio.StreamReader, cw: asyncio.StreamWriter, node: int) -> None:
        head = await sr.readuntil(b"\r\n\r\n")
        cw.write(head)
        if not head.startswith(b"HTTP/1.1 101"):
            await _pipe(sr, cw)  # plain HTTP: passed on as it is
            return
        while True:  # WebSocket frames from the server: unmasked (RFC 6455 §5.2)
            b0, b1 = await sr.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await sr.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await sr.readexactly(8), "big")
            payload = await sr.readexactly(n)
            if b0 == 0x81:  # a whole text message in one frame (the coordinator does not fragment)
                text = payload.decode()
                self.seen.setdefault(node, []).append(text)
                if self.tamper is not None:
                    changed = self.tamper(node, text)
                    if changed != text:
                        self.tampered += 1
                        payload = changed.encode()
            cw.write(_frame(b0, payload))
            await cw.drain()


def _frame(b0: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes([b0, n]) + payload
    if n < 1 << 16:
        return bytes([b0, 126]) + n.to_bytes(2, "big") + payload
    return bytes([b0, 127]) + n.to_bytes(8, "big") + payload


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()


@contextlib.asynccontextmanager
async def proxy_for(live: Coord) -> AsyncIterator[Proxy]:
    async with Proxy(live.url) as p:
        yield p


# ---------------------------------------------------------------------------------------------- the node


def pinned(keys: Sequence[bytes]) -> Callable[[str], object]:
    async def map_keys(key_id: str) -> Sequence[bytes]:
        return keys

    return map_keys


async def enroll(live: Coord, name: str, key: str) -> tuple[NodeKeys, Enrollment]:
    client = ControlClient(live.url, NodeKeys.generate())
    result = await client.register(name, auth_key=key)
    await client.aclose()
    assert isinstance(result, Enrollment)
    return client.keys, result


def node_client(url: str, keys: NodeKeys, e: Enrollment) -> ControlClient:
    """What meshd builds: its keys, its node id, maps checked against the keys pinned at enrollment."""
    return ControlClient(url, keys, e.node_id, map_keys=pinned(e.trusted_keys))  # type: ignore[arg-type]


class Node:
    """A ControlSession as meshd runs it, recording every map it applied."""

    def __init__(self, client: ControlClient) -> None:
        self.applied: list[netmap.NetMap] = []

        async def on_map(m: netmap.NetMap) -> None:
            self.applied.append(m)

        async def on_revoked(why: str) -> None:
            raise AssertionError(f"revoked: {why}")

        self.session = ControlSession(
            client,
            on_map=on_map,
            on_signal=lambda n, p: None,
            on_revoked=on_revoked,
            candidates=lambda: [],
            current_map=lambda: self.applied[-1] if self.applied else None,
        )


    def latest(self, holds: Callable[[netmap.NetMap], bool]) -> netmap.NetMap | None:
        """The map applied last, if `holds` is true of it."""
        return self.applied[-1] if self.applied and holds(self.applied[-1]) else None


def tcp(rules: tuple[InboundRule, ...]) -> set[int]:
    return {lo for r in rules for lo, _ in r.ports}


# ---------------------------------------------------------------------------------------------- the attacks


async def test_a_rewritten_delta_is_refused_logged_and_the_last_good_map_stays(
    live: Coord, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_mod, "RECONNECT_MIN", 0.05)
    caplog.set_level(logging.WARNING, logger="meshd")
    key = await live.user_and_key(reusable=True)
    await enroll(live, "a", key)
    b_keys, b = await enroll(live, "b", key)
    assert (await live.admin.put("/admin/policy", json={"policy": A_TO_B_SSH})).status_code == 200

    async with proxy_for(live) as proxy:
        node = Node(node_client(proxy.url, b_keys, b))
        task = asyncio.create_task(node.session.run())
        try:
            good = await eventually_async(
                lambda: node.latest(lambda m: m.version == live.core.state.version),
                within=5,
                what="b holds the current map",
            )
            assert tcp(good.inbound) == {22}

            def open_everything(_node: int, text: str) -> str:
                o = json.loads(text)
                if o["type"] != "delta" or proxy.tampered:
                    return text
                o["delta"]["inbound"] = ALLOW_EVERYTHING
                o["delta"]["relays"] = [{"id": 1, "name": "default", "url": EVIL_RELAY, "stun_port": 3478}]
                return json.dumps(o)

            proxy.tamper = open_everything
            r = await live.admin.put("/admin/policy", json={"policy": A_TO_B_SSH_AND_WEB})
            assert r.status_code == 200
            await eventually_async(lambda: proxy.tampered == 1, within=5, what="the attacker rewrote a delta")
            # the genuine change still arrives: after the refusal b reconnects from its last good version
            final = await eventually_async(
                lambda: node.latest(lambda m: tcp(m.inbound) == {22, 80}),
                within=10,
                what="the genuine policy change reached b",
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    for m in node.applied:
        assert m.inbound != ALLOW_ALL, "a rewritten delta opened the firewall"
        assert all(r.url != EVIL_RELAY for r in m.relays), "a rewritten delta swapped the relay"
    assert final.version > good.version
    refused = [r.getMessage() for r in caplog.records if "map refused" in r.getMessage()]
    assert len(refused) == 1, refused
    assert "signature" in refused[0] and "does not verify" in refused[0] and f"node {b.node_id}" in refused[0]
    # the reconnect after the refusal resumed from the last good map, not from the rewritten one
    resumed = [p for p in proxy.paths if p.startswith("/api/v1/stream?proto=2&since=")]
    assert resumed and int(resumed[0].rsplit("=", 1)[1]) < final.version


async def test_a_swapped_peer_key_or_endpoint_is_refused(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    await enroll(live, "a", key)
    b_keys, b = await enroll(live, "b", key)
    async with proxy_for(live) as proxy:
        client = node_client(proxy.url, b_keys, b)
        async with client.stream() as control:  # positive control: b's genuine map is taken
            m = await control.next_map(within=5)
            assert [p.name for p in m.peers] == ["a"]

        def swap(_node: int, text: str) -> str:
            o = json.loads(text)
            if o["type"] == "map":
                o["map"]["peers"][0]["node_public_key"] = "A" * 43 + "="
                o["map"]["peers"][0]["endpoints"] = ["6.6.6.6:41641"]
            return json.dumps(o)

        proxy.tamper = swap
        async with client.stream() as stream:
            with pytest.raises(MapRefused, match="does not verify"):
                await stream.recv(within=5)
            assert stream.map is None
        assert proxy.tampered == 1
        await client.aclose()


async def test_a_map_for_another_node_is_refused(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    a_keys, a = await enroll(live, "a", key)
    b_keys, b = await enroll(live, "b", key)
    async with proxy_for(live) as proxy:
        a_client, b_client = node_client(proxy.url, a_keys, a), node_client(proxy.url, b_keys, b)
        async with a_client.stream() as sa:
            await sa.next_map(within=5)
        for_a = proxy.seen[a.node_id][0]  # a's full map, correctly signed by the coordinator (for a)
        assert json.loads(for_a)["type"] == "map"

        async with b_client.stream() as control:  # positive control
            assert (await control.next_map(within=5)).self_node.node_id == b.node_id

        proxy.tamper = lambda node, text: for_a if node == b.node_id and '"type":"map"' in text else text
        async with b_client.stream() as sb:
            with pytest.raises(MapRefused, match=f"does not verify for node {b.node_id}"):
                await sb.recv(within=5)
            assert sb.map is None
        assert proxy.tampered == 1
        await a_client.aclose()
        await b_client.aclose()


async def test_an_old_map_or_delta_replayed_later_is_refused(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    await enroll(live, "a", key)
    b_keys, b = await enroll(live, "b", key)
    async with proxy_for(live) as proxy:
        client = node_client(proxy.url, b_keys, b)
        async with client.stream() as sb:
            await sb.next_map(within=5)
            assert (
                await live.admin.post("/admin/nodes/a/rename", json={"new_name": "aa"})
            ).status_code == 204
            current = await wait_until(
                sb, lambda m: [p.name for p in m.peers] == ["aa"], 5, "b saw the rename"
            )
        old_map = next(t for t in proxy.seen[b.node_id] if json.loads(t)["type"] == "map")
        old_delta = next(t for t in proxy.seen[b.node_id] if json.loads(t)["type"] == "delta")
        assert json.loads(old_map)["map"]["version"] < current.version

        async def resume(replay: str | None) -> netmap.ServerMessage:
            """Reconnect as meshd does (since=our version, our map kept); the attacker answers `replay`."""
            proxy.tamper = None if replay is None else (lambda _n, _t: replay)
            async with client.stream(since=current.version) as s:
                s.map = current
                try:
                    return await s.recv(within=5)
                finally:
                    assert s.map is not None and s.map.version >= current.version

        with pytest.raises(MapRefused, match="older than ours"):
            await resume(old_map)
        with pytest.raises(MapRefused, match="does not follow"):
            await resume(old_delta)
        assert proxy.tampered == 2
        genuine = await resume(None)  # positive control: the coordinator's own answer is taken
        assert isinstance(genuine, netmap.DeltaMessage) and genuine.delta.from_version == current.version
        await client.aclose()
