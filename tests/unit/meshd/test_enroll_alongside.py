"""meshd/enrollment.py enroll_alongside: the interface comes up while enrollment runs (issue 15), and the
errors still come in the order they did one after the other: enrollment's first."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshd import enrollment
from meshd.options import DaemonError


def _enrollment(monkeypatch: pytest.MonkeyPatch, outcome: BaseException | None, after: float = 0.0) -> None:
    async def fake(creds: Any, opts: Any) -> None:
        await asyncio.sleep(after)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(enrollment, "enroll_if_needed", fake)


async def test_a_failed_enrollment_is_the_error_and_the_interface_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _enrollment(monkeypatch, DaemonError("enrollment failed: bad key"), after=0.01)
    started = asyncio.Event()

    async def interface() -> None:
        started.set()
        await asyncio.sleep(10)

    task = asyncio.create_task(interface())
    with pytest.raises(DaemonError, match="bad key"):
        await enrollment.enroll_alongside(None, None, task)  # type: ignore[arg-type]
    assert started.is_set() and task.cancelled()


async def test_an_interface_error_gives_way_to_the_enrollments(monkeypatch: pytest.MonkeyPatch) -> None:
    _enrollment(monkeypatch, DaemonError("enrollment failed: coordinator unreachable"), after=0.05)

    async def interface() -> None:
        raise DaemonError("wireguard-go is not installed")

    task = asyncio.create_task(interface())
    with pytest.raises(DaemonError, match="coordinator unreachable"):
        await enrollment.enroll_alongside(None, None, task)  # type: ignore[arg-type]
    # taken note of, so asyncio does not log "Task exception was never retrieved" for it later
    assert task.done() and not task._log_traceback


async def test_after_enrollment_the_interface_runs_on_for_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    _enrollment(monkeypatch, None)
    go = asyncio.Event()

    async def interface() -> str:
        await go.wait()
        return "up"

    task = asyncio.create_task(interface())
    await enrollment.enroll_alongside(None, None, task)  # type: ignore[arg-type]
    assert not task.done()  # not waited for, not cancelled: the caller awaits it
    go.set()
    assert await task == "up"


async def test_a_stop_during_enrollment_cancels_both(monkeypatch: pytest.MonkeyPatch) -> None:
    _enrollment(monkeypatch, None, after=10)
    task = asyncio.create_task(asyncio.sleep(10))
    outer = asyncio.create_task(enrollment.enroll_alongside(None, None, task))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert task.cancelled()
