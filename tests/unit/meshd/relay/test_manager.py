"""RelayManager's life cycle against a scripted relay on loopback: close() stops everything at once and
nothing reconnects after it; a bad region URL or a failing loop never ends the relay client for good."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator

import pytest

from meshd.proto.encoding import b64encode
from meshd.proto.netmap import RelayRegion
from meshd.proto.ticket import Grant
from meshd.relay import manager as relay_manager
from meshd.relay.manager import RelayManager
from meshd.relay.region import PENDING, RegionLink
from tests.eventually import eventually_async
from tests.unit.meshd.relay.fakerelay import FakeRelay

pytestmark = pytest.mark.timeout(30)

PEER = b64encode(bytes(range(32)))


async def tickets(region_id: int) -> Grant:
    return Grant("ticket", time.time() + 3600, lambda m: bytes(64))


def relay_tasks() -> list[asyncio.Task[object]]:
    """The manager's tasks still alive (they are all named relay-...)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("relay-") and not t.done()]


@pytest.fixture
async def manager() -> AsyncIterator[RelayManager]:
    wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # stands in for WireGuard's port
    wg.bind(("127.0.0.1", 0))
    m = RelayManager(wg_key=bytes(32), wg_port=wg.getsockname()[1], tickets=tickets)
    m.start()
    try:
        yield m
    finally:
        await m.close()
        wg.close()


async def test_close_stops_everything_within_a_second_and_nothing_reconnects(
    manager: RelayManager, fake_relay: FakeRelay
) -> None:
    manager.set_regions([RelayRegion(1, "fake", fake_relay.url, 0)])
    manager.set_peers([(PEER, 1)])
    assert manager.endpoint(PEER) is not None
    await eventually_async(lambda: manager.up, within=5, what="the relay link is up")
    assert fake_relay.connections == 1

    started = time.monotonic()
    await manager.close()
    assert time.monotonic() - started < 1.0
    assert relay_tasks() == []
    await eventually_async(lambda: fake_relay.open == 0, within=2, what="the relay saw the link closed")

    # what the daemon may still call during its tear-down is ignored
    manager.set_regions(
        [RelayRegion(1, "fake", fake_relay.url, 0), RelayRegion(2, "other", fake_relay.url, 0)]
    )
    manager.set_peers([(PEER, 2)])
    assert manager.endpoint(PEER) is None
    assert relay_tasks() == []
    # a negative check, not synchronisation: several reconnect backoffs pass and nobody dials again
    await asyncio.sleep(4 * relay_manager.BACKOFF_MIN)
    assert fake_relay.connections == 1 and not manager.up


async def test_close_while_the_relay_has_not_answered_leaves_no_link(
    manager: RelayManager, fake_relay: FakeRelay
) -> None:
    fake_relay.hold_hello = asyncio.Event()
    manager.set_regions([RelayRegion(1, "fake", fake_relay.url, 0)])
    await eventually_async(lambda: fake_relay.hellos == 1, within=5, what="the client said hello")

    started = time.monotonic()
    await manager.close()
    assert time.monotonic() - started < 1.0
    fake_relay.hold_hello.set()  # the answer arrives after close(): nobody may take it up
    await eventually_async(lambda: fake_relay.open == 0, within=2, what="the half-open link was closed")
    assert relay_tasks() == [] and not manager.up


async def test_close_while_fetching_a_ticket_connects_nowhere(fake_relay: FakeRelay) -> None:
    asked = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow_tickets(region_id: int) -> Grant:
        asked.set()
        try:
            await asyncio.Event().wait()  # the coordinator never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    m = RelayManager(wg_key=bytes(32), wg_port=9, tickets=slow_tickets)
    m.start()
    m.set_regions([RelayRegion(1, "fake", fake_relay.url, 0)])
    await asyncio.wait_for(asked.wait(), 5)
    await m.close()
    assert cancelled.is_set() and relay_tasks() == []
    assert fake_relay.connections == 0


@pytest.mark.parametrize(
    "url", ["ftp://relay.example", "http://127.0.0.1:99999", "http://[::1", "", "http://"]
)
async def test_a_bad_region_url_is_ignored_and_logged_and_fixing_it_in_the_map_connects(
    manager: RelayManager, fake_relay: FakeRelay, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A region meshd cannot use (``http://[`` raised ValueError deep in meshd) costs that region only:
    skipped with a log line, no connect loop for it, the others work."""
    caplog.set_level(logging.WARNING, "meshd.relay")
    manager.set_regions([RelayRegion(3, "bad", url, 0), RelayRegion(1, "other", fake_relay.url, 0)])
    assert "relay map: ignoring region 3" in caplog.text
    assert list(manager.regions) == [1] and "relay-bad" not in [t.get_name() for t in relay_tasks()]
    await eventually_async(lambda: manager.up, within=5, what="the good region connects")

    manager.set_regions([RelayRegion(1, "good", fake_relay.url, 0)])  # the map is corrected
    await eventually_async(lambda: manager.up and manager.home_name() == "good", within=5, what="good is up")


async def test_a_loop_that_raises_is_logged_with_its_traceback_and_restarted(
    fake_relay: FakeRelay, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def broken_keepalive(self: RegionLink, dead_after: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug in keepalive")

    monkeypatch.setattr(RegionLink, "keepalive", broken_keepalive)
    monkeypatch.setattr(relay_manager, "KEEPALIVE", 0.04)
    monkeypatch.setattr(relay_manager, "BACKOFF_MIN", 0.01)
    m = RelayManager(wg_key=bytes(32), wg_port=9, tickets=tickets)
    m.start()
    try:
        m.set_regions([RelayRegion(1, "fake", fake_relay.url, 0)])
        await eventually_async(lambda: calls >= 3, within=5, what="keepalive runs again after the failure")
        record = next(r for r in caplog.records if "relay-maintain failed" in r.getMessage())
        assert record.exc_info is not None and "bug in keepalive" in str(record.exc_info[1])
        assert m.up
    finally:
        await m.close()


async def test_a_failing_state_callback_does_not_take_the_link_down(
    fake_relay: FakeRelay, caplog: pytest.LogCaptureFixture
) -> None:
    def on_state(up: bool) -> None:
        raise RuntimeError("callback bug")

    m = RelayManager(wg_key=bytes(32), wg_port=9, tickets=tickets, on_state=on_state)
    m.start()
    try:
        m.set_regions([RelayRegion(1, "fake", fake_relay.url, 0)])
        await eventually_async(lambda: m.up, within=5, what="the link is up")
        assert "relay state callback failed" in caplog.text
        assert fake_relay.connections == 1
    finally:
        await m.close()


async def test_packets_wait_for_the_link_in_a_bounded_queue(
    manager: RelayManager, fake_relay: FakeRelay
) -> None:
    fake_relay.hold_hello = asyncio.Event()
    manager.set_regions([RelayRegion(1, "fake", fake_relay.url, 0)])
    manager.set_peers([(PEER, 1)])
    await eventually_async(lambda: fake_relay.hellos == 1, within=5, what="the link is connecting")
    for i in range(100):
        manager._send(bytes(range(32)), i.to_bytes(2, "big"))  # what WireGuard sends to the peer's proxy
    region = manager.regions[1]
    assert len(region.pending) == PENDING and manager.dropped == 100 - PENDING
    assert region.pending[0][1] == (100 - PENDING).to_bytes(2, "big")  # the oldest were dropped

