"""HeldWrites/Coalescer: a burst, then one write per interval; the last value offered in a window wins."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from coordinator.coalesce import Coalescer, HeldWrites


def test_a_burst_goes_out_at_once_then_values_are_held_and_the_last_one_wins() -> None:
    rule: HeldWrites[str, int] = HeldWrites(interval=1.0, burst=3)
    assert [rule.offer("n", v, 0.0) for v in (1, 2, 3)] == [True, True, True]
    assert rule.offer("n", 4, 0.1) is False
    assert rule.offer("n", 5, 0.2) is False
    assert rule.due_at("n") is not None and abs(rule.due_at("n") - 1.0) < 1e-9  # type: ignore[operator]
    assert rule.take("n", 1.0) == 5
    assert rule.take("n", 1.0) is None and rule.due_at("n") is None
    assert rule.offer("other", 1, 0.3) is True, "keys have separate windows"


def test_credit_refills_one_per_interval_up_to_the_burst() -> None:
    rule: HeldWrites[str, int] = HeldWrites(interval=1.0, burst=3)
    for v in range(3):
        rule.offer("n", v, 0.0)
    assert rule.offer("n", 9, 2.0) is True  # two intervals: two writes back
    assert rule.offer("n", 9, 2.0) is True
    assert rule.offer("n", 9, 2.0) is False
    assert rule.take("n", 3.0) == 9
    assert rule.offer("n", 1, 100.0) is True  # long idle: full burst again, not more
    assert rule.offer("n", 1, 100.0) is True
    assert rule.offer("n", 1, 100.0) is True
    assert rule.offer("n", 1, 100.0) is False


def test_remembered_keys_are_bounded() -> None:
    rule: HeldWrites[int, int] = HeldWrites(interval=1.0, burst=1, max_keys=100)
    for k in range(10_000):
        rule.offer(k, 1, float(k))  # each key idle long enough to be forgotten later
    assert len(rule._windows) <= 101


@given(st.lists(st.tuples(st.floats(0, 0.5), st.integers(0, 9)), max_size=200))
def test_writes_never_exceed_burst_plus_one_per_interval(offers: list[tuple[float, int]]) -> None:
    rule: HeldWrites[str, int] = HeldWrites(interval=1.0, burst=3)
    now, writes = 0.0, 0
    for step, value in offers:
        now += step
        due = rule.due_at("n")
        if due is not None and due <= now:
            assert rule.take("n", due) is not None
            writes += 1
        writes += rule.offer("n", value, now)
    assert writes <= 3 + now + 1e-9


async def test_the_shell_writes_the_held_value_when_its_window_ends() -> None:
    written: list[tuple[str, int]] = []
    tasks: set[asyncio.Task[None]] = set()

    async def write(key: str, value: int) -> None:
        written.append((key, value))

    loop = asyncio.get_running_loop()
    c: Coalescer[str, int] = Coalescer(HeldWrites(0.05, 2), write, clock=loop.time, tasks=tasks)
    for v in range(200):
        await c.submit("n", v)
    assert written == [("n", 0), ("n", 1)]
    assert len(tasks) == 1, "one delayed write, however many values were offered"
    await asyncio.wait_for(asyncio.gather(*tasks), 1.0)
    assert written[-1] == ("n", 199) and len(written) == 3
