"""The front's pre-auth accounting (coordinator/relay/front.py): caps in total and per source, spare
keep-alive connections closed first, and the eager first step that start_tls relies on."""

from __future__ import annotations

import asyncio
import contextlib

from coordinator.relay.front import PreAuth, eager_task


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_source_at_its_cap_is_refused_and_the_oldest_goes_at_the_total_cap() -> None:
    p = PreAuth(timeout=5, max_total=4, max_per_source=2)
    t = [FakeTransport() for _ in range(6)]
    assert p.admit(1, "a", t[1]) and p.admit(2, "a", t[2])  # type: ignore[arg-type]
    assert not p.admit(3, "a", t[3])  # type: ignore[arg-type]
    assert p.refused == 1 and 3 not in p.conns
    assert p.admit(4, "b", t[4]) and p.admit(5, "c", t[5])  # type: ignore[arg-type]
    assert p.admit(6, "d", FakeTransport())  # type: ignore[arg-type]
    assert t[1].closed and 1 not in p.conns  # the oldest, closed to make room
    assert p.per_source == {"a": 1, "b": 1, "c": 1, "d": 1}
    for key in list(p.conns):
        p.release(key)
    assert not p.conns and not p.per_source and not p.spare


def test_a_spare_keepalive_connection_makes_room_for_a_new_one_from_its_source() -> None:
    p = PreAuth(timeout=5, max_total=100, max_per_source=2)
    idle, busy = FakeTransport(), FakeTransport()
    assert p.admit(1, "nat", idle, spare=True)  # type: ignore[arg-type]
    assert p.admit(2, "nat", busy, spare=True)  # type: ignore[arg-type]
    p.busy(2)  # one byte of its next request came: it counts fully now
    assert p.admit(3, "nat", FakeTransport())  # type: ignore[arg-type]
    assert idle.closed and not busy.closed and p.refused == 0
    assert not p.admit(4, "nat", FakeTransport())  # no spare left: refused
    assert p.refused == 1 and p.per_source["nat"] == 2 and not p.spare


async def test_eager_task_runs_the_first_step_before_returning() -> None:
    steps: list[str] = []
    gate = asyncio.get_running_loop().create_future()

    async def work() -> None:
        steps.append("first")
        await gate
        steps.append("rest")

    task = eager_task(asyncio.get_running_loop(), work())
    assert steps == ["first"]
    gate.set_result(None)
    await task
    assert steps == ["first", "rest"]


async def test_eager_task_cancellation_reaches_the_coroutine() -> None:
    seen: list[str] = []

    async def work() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = eager_task(asyncio.get_running_loop(), work())
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"] and task.cancelled()
