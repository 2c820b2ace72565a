"""tests/eventually.py: the one way tests wait. It returns what it waited for and fails when it must."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.eventually import EventuallyTimeout, eventually, eventually_async


def counter_reaching(n: int) -> tuple[list[int], Callable[[], int | None]]:
    """A predicate that becomes true on its n-th call, and the list of calls made."""
    calls: list[int] = []

    def predicate() -> int | None:
        calls.append(len(calls) + 1)
        return len(calls) if len(calls) >= n else None

    return calls, predicate


def test_returns_the_first_truthy_value() -> None:
    values: Iterator[object] = iter([None, 0, "", [], {"ready": True}, {"later": True}])
    assert eventually(lambda: next(values), within=5, interval=0.001) == {"ready": True}


def test_a_predicate_true_at_once_is_called_once() -> None:
    calls, predicate = counter_reaching(1)
    assert eventually(predicate, within=5) == 1
    assert calls == [1]


def test_fails_when_the_predicate_never_holds_with_what_and_the_last_value() -> None:
    calls, predicate = counter_reaching(10**9)
    start = time.monotonic()
    with pytest.raises(EventuallyTimeout) as failed:
        eventually(predicate, within=0.2, interval=0.01, what="the door opens")
    took = time.monotonic() - start
    assert 0.2 <= took < 2.0
    assert str(failed.value) == "not within 0.2 s: the door opens (last value: None)"
    assert isinstance(failed.value, AssertionError), "a timeout is a test failure, not an error"
    assert len(calls) > 2, "it kept asking"


def test_the_failure_names_the_predicate_when_what_is_not_given() -> None:
    def door_is_open() -> bool:
        return False

    with pytest.raises(EventuallyTimeout, match=r"^not within 0\.05 s: door_is_open \(last value: False\)$"):
        eventually(door_is_open, within=0.05, interval=0.01)


def test_ignored_exceptions_mean_not_yet_and_the_last_one_is_reported() -> None:
    attempts = iter([ConnectionRefusedError("starting"), ConnectionRefusedError("still")])

    def connect() -> str:
        for refusal in attempts:
            raise refusal
        return "up"

    assert eventually(connect, within=5, interval=0.001, ignore=(ConnectionRefusedError,)) == "up"

    def refused() -> str:
        raise ConnectionRefusedError("nobody listens")

    with pytest.raises(EventuallyTimeout, match=r"last error: ConnectionRefusedError\('nobody listens'\)"):
        eventually(refused, within=0.05, interval=0.01, ignore=(ConnectionRefusedError,))


def test_other_exceptions_fail_at_once() -> None:
    calls: list[float] = []

    def broken() -> bool:
        calls.append(time.monotonic())
        raise KeyError("bug")

    with pytest.raises(KeyError):
        eventually(broken, within=5, ignore=(ConnectionRefusedError,))
    assert len(calls) == 1


def test_the_predicate_gets_a_last_try_at_the_deadline() -> None:
    start = time.monotonic()
    # with an interval longer than the whole wait, the second (and last) call is at the deadline
    assert eventually(lambda: time.monotonic() - start >= 0.1 or None, within=0.1, interval=10) is True
    assert time.monotonic() - start < 1.0, "never sleeps past the deadline"


@pytest.mark.parametrize(("within", "interval"), [(0, 0.1), (-1, 0.1), (1, 0)])
def test_nonsense_durations_are_refused(within: float, interval: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        eventually(lambda: True, within=within, interval=interval)


async def test_async_accepts_coroutine_and_plain_predicates() -> None:
    calls, predicate = counter_reaching(3)

    async def ready() -> int | None:
        return predicate()

    assert await eventually_async(ready, within=5, interval=0.001) == 3
    assert calls == [1, 2, 3]
    assert await eventually_async(lambda: "plain", within=1) == "plain"


async def test_async_fails_when_the_predicate_never_holds() -> None:
    async def never_ready() -> bool:
        return False

    with pytest.raises(
        EventuallyTimeout, match=r"^not within 0\.1 s: the map shows b \(last value: False\)$"
    ):
        await eventually_async(never_ready, within=0.1, interval=0.01, what="the map shows b")


async def test_async_ignores_only_what_it_is_told_to() -> None:
    async def flaky() -> bool:
        raise TimeoutError

    with pytest.raises(EventuallyTimeout, match="last error: TimeoutError"):
        await eventually_async(flaky, within=0.05, interval=0.01, ignore=(TimeoutError,))
    with pytest.raises(TimeoutError):
        await eventually_async(flaky, within=5)
