"""The port-map shell's close (issue 11): bounded whatever UPnP does, and no UPnP map left behind.

UPnP is faked (miniupnpc blocks in C; here the fake blocks on events); NAT-PMP/PCP go to a loopback
"gateway" where nobody answers, so only UPnP can map.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from meshd.nat import mapper, upnp
from tests.eventually import eventually_async


class FakeIgd:
    """An IGD whose add blocks until ``release`` is set (or forever)."""

    adding = threading.Event()
    release = threading.Event()
    maps: set[int] = set()

    @classmethod
    def discover(cls, *, gateway: str | None = None, discover_ms: int = 300) -> FakeIgd:
        return cls()

    def external_ip(self) -> str:
        return "6.0.0.9"

    def add_mapping(self, internal_port: int, lease: int, tag: str) -> upnp.UpnpMapping:
        FakeIgd.adding.set()
        FakeIgd.release.wait(30)
        FakeIgd.maps.add(internal_port)
        return upnp.UpnpMapping("6.0.0.9", internal_port, "127.0.0.1", internal_port, lease)

    def delete_mapping(self, external_port: int) -> None:
        FakeIgd.maps.discard(external_port)


@pytest.fixture(autouse=True)
def fake_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    FakeIgd.adding, FakeIgd.release, FakeIgd.maps = threading.Event(), threading.Event(), set()
    monkeypatch.setattr(mapper, "default_gateway", lambda: ("127.0.0.2", "127.0.0.1"))
    monkeypatch.setattr(upnp, "Igd", FakeIgd)
    yield
    FakeIgd.release.set()  # let a fake that was left blocking finish (its thread is a daemon anyway)


async def test_a_upnp_map_still_being_made_at_close_is_deleted() -> None:
    changes: list[object] = []
    shell = mapper.PortMapShell(41641, "t/m0", lambda p, e: changes.append((p, e)))
    await shell.start()
    await asyncio.to_thread(FakeIgd.adding.wait, 5)
    closing = asyncio.create_task(shell.close())
    await asyncio.sleep(0.1)  # close is now waiting for the add (which the router is still doing)
    FakeIgd.release.set()
    await asyncio.wait_for(closing, mapper.CLOSE_TIMEOUT + 0.5)
    assert FakeIgd.maps == set(), "the map that arrived during close was deleted"


async def test_close_is_bounded_when_the_router_never_answers() -> None:
    shell = mapper.PortMapShell(41641, "t/m0", lambda p, e: None)
    await shell.start()
    await asyncio.to_thread(FakeIgd.adding.wait, 5)
    t0 = time.monotonic()
    await shell.close(within=0.5)
    assert time.monotonic() - t0 < 0.8
    # the stuck call runs in a daemon thread: it cannot keep the process from exiting
    stuck = [t for t in threading.enumerate() if t.name == "upnp-add"]
    assert stuck and all(t.daemon for t in stuck)


async def test_close_cut_short_by_the_caller_leaves_no_task_behind() -> None:
    shell = mapper.PortMapShell(41641, "t/m0", lambda p, e: None)
    await shell.start()
    await asyncio.to_thread(FakeIgd.adding.wait, 5)
    before = asyncio.all_tasks()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(shell.close(within=5.0), 0.2)
    await asyncio.sleep(0)
    assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()


async def test_a_wake_together_with_the_cancellation_does_not_keep_a_loop_alive() -> None:
    """Python 3.11's ``wait_for(event.wait(), t)`` swallows a cancel that comes with the event: the loop
    ran on after the stop cancelled it, and a close that awaited it hung (issue 11)."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            event.clear()
            await mapper.wait_set(event, 5.0)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    event.set()  # a datagram arrives ...
    task.cancel()  # ... as the daemon stops
    done, _ = await asyncio.wait([task], timeout=1.0)
    assert done and task.cancelled()


async def test_the_shell_loops_end_on_close_even_when_woken_at_that_moment() -> None:
    shell = mapper.PortMapShell(41641, "t/m0", lambda p, e: None)
    await shell.start()
    loops = shell._tasks.tasks
    assert {t.get_name() for t in loops} == {"portmap", "upnp"}
    shell._wake.set()
    # the port-map loop clears the wake just before it waits: then it is parked in its wait
    await eventually_async(lambda: not shell._wake.is_set(), within=5.0)
    shell._wake.set()  # what the gateway's answer does, at the moment the daemon stops
    FakeIgd.release.set()
    await shell.close()
    assert all(t.done() for t in loops)
