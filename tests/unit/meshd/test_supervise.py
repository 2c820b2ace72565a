"""meshd.supervise: a failing loop is logged and restarted with backoff; cancellation always propagates."""

from __future__ import annotations

import asyncio
import logging

import pytest

from meshd.supervise import TaskGroup, Transient, supervise
from tests.eventually import eventually_async


async def test_a_failing_loop_is_restarted_with_growing_backoff_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = 0
    delays: list[float] = []

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs < 4:
            raise OSError("disk full")

    async def fake_sleep(d: float) -> None:
        delays.append(d)

    with caplog.at_level(logging.ERROR, "meshd.supervise"):
        await supervise("renew", loop, backoff_min=1.0, backoff_max=3.0, sleep=fake_sleep)
    assert runs == 4
    assert [round(d) for d in delays] == [1, 2, 3]  # doubles, capped (±10 % jitter)
    failures = [r for r in caplog.records if "task renew failed" in r.getMessage()]
    assert len(failures) == 3 and all(r.exc_info for r in failures)  # with the traceback


async def test_a_loop_that_keeps_failing_is_handed_to_on_fatal() -> None:
    fatal: list[str] = []

    async def loop() -> None:
        raise ValueError("bad region URL")

    async def no_sleep(d: float) -> None:
        return None

    await supervise(
        "relay", loop, give_up_after=3, on_fatal=lambda name, e: fatal.append(f"{name}: {e}"), sleep=no_sleep
    )
    assert fatal == ["relay: bad region URL"]


async def test_cancellation_propagates_through_the_supervisor() -> None:
    started = asyncio.Event()

    async def loop() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise("stream", loop))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancelled_error_raised_inside_the_loop_is_not_restarted() -> None:
    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await supervise("x", loop)
    assert runs == 1


async def test_task_group_stop_is_bounded_even_when_a_task_ignores_cancellation() -> None:
    group = TaskGroup()
    release = asyncio.Event()

    async def stubborn() -> None:
        while True:
            try:
                await release.wait()
                return
            except asyncio.CancelledError:
                continue  # misbehaves on purpose

    async def polite() -> None:
        await asyncio.Event().wait()

    group.start("stubborn", stubborn)
    group.start("polite", polite)
    await eventually_async(lambda: len(group.tasks) == 2, within=1.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await group.stop(within=0.3)
    assert loop.time() - t0 < 1.0
    release.set()  # let the stubborn one end so the test leaves nothing behind
    await asyncio.sleep(0)


async def test_a_transient_failure_is_one_line_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    # the resolver's bind while the mesh interface is being torn down (seen in the stop stress test)
    from meshd.dns.server import Resolver, ResolverBindError
    from meshd.dns.zone import build

    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            await Resolver("192.0.2.77", 53, build("mesh", ())).serve()  # not an address of this host

    async def no_sleep(d: float) -> None:
        pass

    with caplog.at_level(logging.WARNING, "meshd.supervise"):
        await supervise("dns", loop, sleep=no_sleep)
    assert runs == 2
    [line] = [r for r in caplog.records if "task dns" in r.getMessage()]
    assert line.levelno == logging.WARNING and not line.exc_info
    assert "resolver cannot bind 192.0.2.77:53" in line.getMessage()
    assert issubclass(ResolverBindError, Transient)
