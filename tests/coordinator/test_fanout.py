"""Fan-out (issue 16): a change is encoded once per view and the same bytes reach every node it leaves
alone; the node it touches gets a delta signed for it. Nodes check both as meshd does (pinned keys)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence

import pytest

from coordinator import hub as hub_mod
from meshd.control import ControlClient, Enrollment, MapStream, NodeKeys
from tests.coordinator.conftest import Coord
from tests.coordinator.test_stream import wait_until


def pinned(keys: Sequence[bytes]) -> Callable[[str], Awaitable[Sequence[bytes]]]:
    async def map_keys(_key_id: str) -> Sequence[bytes]:
        return keys

    return map_keys


async def enroll(live: Coord, name: str, key: str) -> ControlClient:
    keys = NodeKeys.generate()
    client = ControlClient(live.url, keys)
    e = await client.register(name, auth_key=key)
    await client.aclose()
    assert isinstance(e, Enrollment)
    return ControlClient(live.url, keys, e.node_id, map_keys=pinned(e.trusted_keys))


def recording(stream: MapStream) -> list[str | bytes]:
    """Keep every message text the stream receives (as the node got it, before parsing)."""
    texts: list[str | bytes] = []
    recv = stream.ws.recv

    async def recv_and_keep(*args: object, **kw: object) -> str | bytes:
        text = await recv()
        texts.append(text)
        return text

    stream.ws.recv = recv_and_keep  # type: ignore[method-assign]
    return texts


async def test_a_rename_is_encoded_once_and_the_same_bytes_reach_every_other_node(
    live: Coord, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await live.user_and_key(reusable=True)
    clients = [await enroll(live, name, key) for name in ("a", "b", "c", "d")]
    encoded: list[str] = []
    real = hub_mod.Frame.of

    def counting(text: str) -> hub_mod.Frame:
        encoded.append(text)
        return real(text)

    monkeypatch.setattr(hub_mod.Frame, "of", staticmethod(counting))
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(c.stream()) for c in clients]
        for s in streams:  # the connects' online flags settle first (they touch the connecting nodes)
            await wait_until(
                s, lambda m: len(m.peers) == 3 and all(p.online for p in (*m.peers, m.self_node)), 10
            )
        texts = [recording(s) for s in streams]
        assert (await live.admin.post("/admin/nodes/a/rename", json={"new_name": "aa"})).status_code == 204
        await wait_until(streams[0], lambda m: m.self_node.name == "aa", 5, "a saw its own rename")
        for s in streams[1:]:
            await wait_until(s, lambda m: "aa" in {p.name for p in m.peers}, 5, "a peer saw the rename")
        others = {t for ts in texts[1:] for t in ts}
        assert len(others) == 1, "b, c and d got byte-identical deltas"
        text = others.pop()
        shared = json.loads(text)
        assert shared["type"] == "delta" and shared["view"] == streams[1].map.view  # type: ignore[union-attr]
        assert "self" not in shared["delta"]
        # counted per text: the connects' online-flag deltas may also be shared frames, encoded while the
        # streams settled (before the recording started)
        assert encoded.count(text) == 1, "encoded once for the view, not once per stream"
        (own,) = texts[0]
        mine = json.loads(own)
        assert "view" not in mine and mine["delta"]["self"]["n"] == "aa", "a's delta is signed for a"
    for c in clients:
        await c.aclose()
