"""meshd's netlink calls work on uvloop too (meshd/netlink.py): pyroute2's AF_NETLINK endpoints, which
uvloop refuses, run on an asyncio loop in one thread; on asyncio's own loop they run inline."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshd import eventloop
from meshd.netlink import netlink_call
from meshd.wg import link

uvloop = pytest.importorskip("uvloop")


@netlink_call
async def _where() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


def test_on_asyncio_a_netlink_call_runs_inline() -> None:
    assert asyncio.run(_where()) == threading.current_thread().name


def test_on_uvloop_a_netlink_call_runs_on_the_netlink_thread() -> None:
    assert uvloop.run(_where()) == "meshd-netlink"


def test_a_real_rtnetlink_lookup_works_on_uvloop_and_on_asyncio() -> None:
    # uvloop refuses pyroute2's own endpoint ("invalid family 16") without the netlink thread
    assert uvloop.run(link.link_index("lo")) == asyncio.run(link.link_index("lo")) == 1
    assert uvloop.run(link.link_index("no-such-link0")) is None


def test_the_callers_cancellation_reaches_the_call_on_the_netlink_thread() -> None:
    started, cancelled = threading.Event(), threading.Event()

    @netlink_call
    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        task = asyncio.ensure_future(slow())
        assert await asyncio.to_thread(started.wait, 2.0)  # the call began on the netlink thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    uvloop.run(main())
    assert cancelled.wait(2.0)


def test_errors_of_the_call_reach_the_caller() -> None:
    @netlink_call
    async def fails() -> None:
        raise OSError(19, "no such device")

    with pytest.raises(OSError, match="no such device"):
        uvloop.run(fails())


def test_meshd_runs_on_uvloop_when_installed_and_asyncio_when_told(monkeypatch: pytest.MonkeyPatch) -> None:
    async def name() -> str:
        return eventloop.running_name()

    assert eventloop.run(name()) == "uvloop"
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.run(name()) == "asyncio"
