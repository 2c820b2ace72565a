"""One way for tests to wait: ``eventually(predicate, within=...)``.

Tests never sleep to synchronise. They state what must become true and how long it may take; the
helper polls, returns the predicate's first truthy value (so a test can use what it waited for) and,
when time runs out, fails with the description and the last value or exception seen, which is what
a reader of a red test needs.

``never(predicate, for_=...)`` is its mirror, for what must not happen during a time that is itself the
spec. ``eventually`` is for synchronous predicates (subprocesses, namespaces, files); ``eventually_async``
takes a predicate that may be a coroutine function (in-process servers, ASGI clients).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")


class EventuallyTimeout(AssertionError):
    """The predicate did not hold within the allotted time."""


def _fail(what: str, within: float, last: object, error: BaseException | None) -> EventuallyTimeout:
    detail = f"last error: {error!r}" if error is not None else f"last value: {last!r}"
    return EventuallyTimeout(f"not within {within:g} s: {what} ({detail})")


def _check(within: float, interval: float) -> None:
    if not within > 0 or not interval > 0:
        raise ValueError(f"within and interval must be positive, not {within!r} and {interval!r}")


def eventually(
    predicate: Callable[[], T],
    *,
    within: float,
    interval: float = 0.05,
    what: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns a truthy value; return that value.

    Exceptions of the types in ``ignore`` count as "not yet" (for example a connection refused while
    a server starts); any other exception fails the test at once. The predicate is always tried once
    more at the deadline (never a sleep past it), so a slow predicate still gets its last chance.
    """
    _check(within, interval)
    deadline = time.monotonic() + within
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as e:
            error = e
        else:
            error = None
            if value:
                return value
            last = value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _fail(what or getattr(predicate, "__name__", "predicate"), within, last, error)
        time.sleep(min(interval, remaining))


def never(predicate: Callable[[], object], *, for_: float, interval: float = 0.2, what: str = "") -> None:
    """The mirror of :func:`eventually`, for specs like "nothing changes during 4 s": call ``predicate``
    for ``for_`` seconds (at the end too) and fail at once, with its value, the first time it is truthy."""
    _check(for_, interval)
    deadline = time.monotonic() + for_
    while True:
        value = predicate()
        if value:
            name = what or getattr(predicate, "__name__", "predicate")
            raise AssertionError(f"within {for_:g} s: {name} ({value!r})")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(interval, remaining))


@overload
async def eventually_async(
    predicate: Callable[[], Awaitable[T]],
    *,
    within: float,
    interval: float = ...,
    what: str = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


@overload
async def eventually_async(
    predicate: Callable[[], T],
    *,
    within: float,
    interval: float = ...,
    what: str = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


async def eventually_async(
    predicate: Callable[[], object],
    *,
    within: float,
    interval: float = 0.02,
    what: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> object:
    """Like :func:`eventually`, for use inside a running event loop; ``predicate`` may be async."""
    _check(within, interval)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            result = predicate()
            value = await result if inspect.isawaitable(result) else result
        except ignore as e:
            error = e
        else:
            error = None
            if value:
                return value
            last = value
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise _fail(what or getattr(predicate, "__name__", "predicate"), within, last, error)
        await asyncio.sleep(min(interval, remaining))
