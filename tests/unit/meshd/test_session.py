"""meshd.session: the map stream held with reconnects, candidates announced one way, revocation confirmed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from meshd import session as session_mod
from meshd.control import ControlError
from meshd.proto import netmap
from meshd.session import ControlSession
from tests.eventually import eventually_async

SELF = netmap.Peer(1, "a", ("100.64.0.1/32",), "k" * 43 + "=", "n" * 43 + "=", "cert")


def a_map(version: int) -> netmap.NetMap:
    return netmap.NetMap(version, SELF, (), (), "", "mesh")


class FakeStream:
    def __init__(self, script: list[object]) -> None:
        self.script = script  # messages to return, or exceptions to raise
        self.map: netmap.NetMap | None = None
        self.sent: list[tuple[str, object]] = []

    async def recv(self) -> netmap.ServerMessage:
        if not self.script:
            await asyncio.Event().wait()
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, netmap.MapMessage):
            self.map = item.map
        assert isinstance(item, netmap.MapMessage | netmap.SignalMessage | netmap.ErrorMessage)
        return item

    async def send_endpoints(self, cands: list[str]) -> None:
        self.sent.append(("endpoints", list(cands)))

    async def send_signal(self, to: int, payload: dict[str, Any]) -> None:
        self.sent.append(("signal", (to, payload)))


class FakeClient:
    def __init__(self, streams: list[FakeStream | ControlError], fetch_error: ControlError | None = None):
        self.streams = streams
        self.fetch_error = fetch_error
        self.since: list[int | None] = []

    @asynccontextmanager
    async def stream(self, since: int | None = None) -> AsyncIterator[FakeStream]:
        self.since.append(since)
        nxt = self.streams.pop(0) if self.streams else ControlError("no coordinator", 0)
        if isinstance(nxt, ControlError):
            raise nxt
        yield nxt

    async def fetch_map(self, since: int | None = None) -> None:
        if self.fetch_error is not None:
            raise self.fetch_error

    urls: tuple[str, ...] = ("http://coordinator",)
    url = "http://coordinator"

    def fail_over(self) -> bool:
        return False


class Replicas(FakeClient):
    """Several coordinator URLs (replicas, issue 16): each has its own script of streams."""

    def __init__(self, scripts: dict[str, list[FakeStream | ControlError]]) -> None:
        super().__init__([])
        self.scripts = scripts
        self.urls = tuple(scripts)
        self.url = self.urls[0]
        self.tried: list[tuple[str, float]] = []  #: (URL, loop time) of every stream attempt

    @asynccontextmanager
    async def stream(self, since: int | None = None) -> AsyncIterator[FakeStream]:
        self.since.append(since)
        self.tried.append((self.url, asyncio.get_running_loop().time()))
        script = self.scripts[self.url]
        nxt = script.pop(0) if script else ControlError(f"cannot reach {self.url}", 0)
        if isinstance(nxt, ControlError):
            raise nxt
        yield nxt

    def fail_over(self) -> bool:
        self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
        return True


@pytest.fixture(autouse=True)
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_mod, "RECONNECT_MIN", 0.01)


def make(client: FakeClient, applied: list[netmap.NetMap], **kw: Any) -> ControlSession:
    async def on_map(m: netmap.NetMap) -> None:
        applied.append(m)

    async def on_revoked(why: str) -> None:
        kw.setdefault("revoked", []).append(why)

    return ControlSession(
        client,  # type: ignore[arg-type]
        on_map=on_map,
        on_signal=kw.get("on_signal", lambda n, p: None),
        on_revoked=kw.get("on_revoked", on_revoked),
        candidates=lambda: ["6.0.0.2:41641"],
        current_map=lambda: applied[-1] if applied else None,
    )


async def test_maps_are_applied_and_a_reconnect_resumes_from_the_applied_version() -> None:
    first = FakeStream([netmap.MapMessage(a_map(3)), ControlError("map stream closed: restarting", 1012)])
    second = FakeStream([netmap.MapMessage(a_map(5))])
    client = FakeClient([first, second])
    applied: list[netmap.NetMap] = []
    s = make(client, applied)
    task = asyncio.create_task(s.run())
    await eventually_async(lambda: [m.version for m in applied] == [3, 5], within=2.0)
    assert client.since == [None, 3]
    assert s.connected
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not s.connected


async def test_every_connect_announces_the_current_candidates_and_changes_go_out_at_once() -> None:
    stream = FakeStream([])
    s = make(FakeClient([stream]), [])
    task = asyncio.create_task(s.run())
    await eventually_async(lambda: stream.sent == [("endpoints", ["6.0.0.2:41641"])], within=2.0)
    await s.announce(["6.0.0.2:41641", "10.0.0.2:41641"])
    assert stream.sent[-1] == ("endpoints", ["6.0.0.2:41641", "10.0.0.2:41641"])
    assert s.announced == ["6.0.0.2:41641", "10.0.0.2:41641"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_signals_reach_the_path_strategy() -> None:
    got: list[tuple[int, dict[str, Any]]] = []
    stream = FakeStream([netmap.SignalMessage(7, {"type": "cmm", "at": 1.0})])
    s = make(FakeClient([stream]), [], on_signal=lambda n, p: got.append((n, p)))
    task = asyncio.create_task(s.run())
    await eventually_async(lambda: got == [(7, {"type": "cmm", "at": 1.0})], within=2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_closed_stream_alone_is_not_revocation() -> None:
    """4403 on the stream, but the signed map request is accepted: a restarting coordinator, keep going."""
    revoked: list[str] = []
    refused = ControlError("map stream closed: removed", netmap.CloseCode.REVOKED)
    client = FakeClient([refused, FakeStream([netmap.MapMessage(a_map(1))])])
    applied: list[netmap.NetMap] = []
    s = make(client, applied, revoked=revoked)
    task = asyncio.create_task(s.run())
    await eventually_async(lambda: applied, within=2.0)
    assert revoked == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_revocation_confirmed_by_a_signed_request_ends_the_session() -> None:
    revoked: list[str] = []

    async def on_revoked(why: str) -> None:
        revoked.append(why)

    refused = ControlError("map stream closed: node removed", netmap.CloseCode.REVOKED)
    client = FakeClient([refused], fetch_error=ControlError("coordinator said 401", 401))
    s = make(client, [], on_revoked=on_revoked)
    await asyncio.wait_for(s.run(), 2.0)  # returns: no reconnect after revocation
    assert revoked == ["map stream closed: node removed"]


async def test_a_refused_map_keeps_the_last_good_one_and_backs_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A map that does not verify is never applied; the session says why in one warning line and
    reconnects from the last good version, backing off (an attacker rewriting every message must not
    make it reconnect at full speed)."""
    from meshd.control import MapRefused

    monkeypatch.setattr(session_mod, "RECONNECT_MIN", 0.1)
    caplog.set_level(logging.WARNING, logger="meshd")
    bad = MapRefused("map refused: delta 3->4: signature by key 00 does not verify for node 1")
    streams: list[FakeStream | ControlError] = [FakeStream([netmap.MapMessage(a_map(3)), bad])]
    streams += [FakeStream([bad]) for _ in range(3)]
    streams.append(FakeStream([netmap.MapMessage(a_map(4))]))
    client = FakeClient(streams)
    applied: list[netmap.NetMap] = []
    s = make(client, applied)
    task = asyncio.create_task(s.run())
    await eventually_async(lambda: [m.version for m in applied] == [3, 4], within=5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.since == [None, 3, 3, 3, 3], "every reconnect resumes from the last good map"
    refused = [r.getMessage() for r in caplog.records if "map refused" in r.getMessage()]
    assert [m.rsplit("retrying in ", 1)[1] for m in refused] == ["0.1 s", "0.2 s", "0.4 s", "0.8 s"], (
        "refusals back off although the stream opened"
    )


async def test_a_dead_replica_is_left_for_the_next_url_at_once_resuming_with_since(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_mod, "RECONNECT_MIN", 0.5)  # the real first delay
    died = ControlError("map stream closed: connection lost", 1006)
    client = Replicas(
        {
            "http://r1": [FakeStream([netmap.MapMessage(a_map(3)), died])],
            "http://r2": [FakeStream([netmap.MapMessage(a_map(4))])],
        }
    )
    applied: list[netmap.NetMap] = []
    task = asyncio.create_task(make(client, applied).run())
    await eventually_async(lambda: [m.version for m in applied] == [3, 4], within=3.0)
    assert [u for u, _ in client.tried] == ["http://r1", "http://r2"]
    assert client.since == [None, 3]  # resumed: only what was missed
    assert client.tried[1][1] - client.tried[0][1] <= session_mod.FAILOVER_WAIT + 0.2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_when_every_replica_fails_each_is_tried_in_turn_with_the_usual_backoff_between_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_mod, "RECONNECT_MIN", 0.2)
    client = Replicas({"http://r1": [], "http://r2": [], "http://r3": []})
    task = asyncio.create_task(make(client, []).run())
    await eventually_async(lambda: len(client.tried) >= 5, within=10.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [u for u, _ in client.tried[:5]] == [
        "http://r1",
        "http://r2",
        "http://r3",
        "http://r1",
        "http://r2",
    ]
    gaps = [b - a for (_, a), (_, b) in zip(client.tried, client.tried[1:], strict=False)]
    assert max(gaps[:2]) <= session_mod.FAILOVER_WAIT + 0.2  # within a round: the next replica soon
    assert gaps[2] >= 0.8 * 0.5 - 0.05  # after a round: the backoff (0.8 s +-50 %)


async def test_a_refused_stream_is_not_taken_elsewhere() -> None:
    client = Replicas({"http://r1": [ControlError("stream refused: HTTP 403", 403)], "http://r2": []})
    client.fetch_error = ControlError("coordinator said 403", 403)
    revoked: list[str] = []
    await asyncio.wait_for(make(client, [], revoked=revoked).run(), 3)
    assert [u for u, _ in client.tried] == ["http://r1"] and revoked
