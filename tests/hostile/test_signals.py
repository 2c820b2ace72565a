"""Signals between nodes (call-me-maybe) go only where the policy lets the sender see the target, are
capped in size and rate-limited per sender. Mallory, whom the policy hides from bob, sends bob signals:
bob never receives one, and mallory's answer for bob is the one for a node id that does not exist. A
flood is cut by the rate limit. Live coordinator on loopback (like tests/coordinator/test_stream.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from coordinator.api import stream as stream_api
from meshd.control import MapStream
from meshd.proto import netmap
from tests.coordinator.conftest import Coord, coord, core, live, settings  # noqa: F401 - fixtures
from tests.coordinator.test_stream import enroll_live, next_message, next_signal

pytestmark = [pytest.mark.hostile, pytest.mark.timeout(60)]

#: alice may reach bob (so they see each other); mallory is in no rule: she sees nobody, nobody sees her
POLICY = '[[rules]]\nsrc = ["user:alice"]\ndst = ["user:bob:22"]\n'


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"


async def signals_for(s: MapStream, within: float) -> list[netmap.SignalMessage]:
    """Every signal that arrives on `s` within `within` seconds (a bounded wait for what must not come)."""
    got: list[netmap.SignalMessage] = []
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await s.recv(within=left)
        except TimeoutError:
            break
        if isinstance(msg, netmap.SignalMessage):
            got.append(msg)
    return got


async def error_for(s: MapStream, peer: int, payload: dict[str, object]) -> str:
    await s.send_signal(peer, payload)
    return (await next_message(s, netmap.ErrorMessage, 2.0)).message


async def test_a_hidden_node_never_gets_signals_and_looks_like_a_node_that_does_not_exist(
    live: Coord,  # noqa: F811
) -> None:
    keys = [await live.user_and_key(user) for user in ("alice", "bob", "mallory")]
    r = await live.admin.put("/admin/policy", json={"policy": POLICY})
    assert r.status_code == 200, r.text
    a, b, m = [await enroll_live(live, name, k) for name, k in zip("abm", keys, strict=True)]
    assert a.node_id is not None and b.node_id is not None and m.node_id is not None
    async with a.stream() as sa, b.stream() as sb, m.stream() as sm:
        for s in (sa, sb, sm):
            await s.next_map(within=5)
        # the attack: mallory knows (or guesses) bob's node id and asks him to punch a hole to her
        hidden = await error_for(sm, b.node_id, {"type": "cmm", "candidates": ["6.6.6.6:41641"]})
        missing = await error_for(sm, 999_999, {"type": "cmm", "candidates": ["6.6.6.6:41641"]})
        assert hidden.replace(str(b.node_id), "N") == missing.replace("999999", "N"), (hidden, missing)
        assert await signals_for(sb, 0.5) == [], "bob received mallory's signal"
        # positive control: alice, whom the policy lets see bob, reaches him the same way
        await sa.send_signal(b.node_id, {"type": "cmm", "candidates": ["6.0.0.2:41641"]})
        assert (await next_signal(sb, 2.0)).peer == a.node_id
        # and bob cannot reach mallory either (visibility holds both ways)
        assert "unknown peer" in await error_for(sb, m.node_id, {"type": "cmm"})
        assert await signals_for(sm, 0.3) == []
    for c in (a, b, m):
        await c.aclose()


async def test_a_flood_of_signals_is_cut_by_the_rate_limit_and_big_ones_are_refused(
    live: Coord,  # noqa: F811
) -> None:
    key = await live.user_and_key(reusable=True)
    a, b = await enroll_live(live, "a", key), await enroll_live(live, "b", key)
    assert b.node_id is not None
    async with a.stream() as sa, b.stream() as sb:
        await sa.next_map(within=5)
        await sb.next_map(within=5)
        big = await error_for(sa, b.node_id, {"type": "cmm", "pad": "x" * stream_api.MAX_SIGNAL})
        assert "larger than 8 KiB" in big
        start = time.monotonic()
        for i in range(300):
            await sa.send_signal(b.node_id, {"type": "cmm", "i": i})
        got = await signals_for(sb, 1.0)
        elapsed = time.monotonic() - start
        allowed = stream_api.SIGNAL_BURST + stream_api.SIGNAL_RATE * elapsed
        assert 0 < len(got) <= allowed, (len(got), allowed)
        assert len(got) < 300
        # the sender is told, not silently dropped
        assert "rate limit" in (await next_message(sa, netmap.ErrorMessage, 2.0)).message
        # and the bucket refills: after a short pause a signal goes through again
        await asyncio.sleep(0.2)  # the rate is the spec here: 0.2 s refills 4 tokens at 20/s
        await sa.send_signal(b.node_id, {"type": "cmm", "after": True})
        assert any(s.payload.get("after") for s in await signals_for(sb, 1.0))
    await a.aclose()
    await b.aclose()
