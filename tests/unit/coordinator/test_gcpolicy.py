"""The coordinator's GC policy: survivors frozen out of full collections, everything thawed and collected
once in a while (coordinator/gcpolicy.py)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from coordinator import gcpolicy


class _Obj:
    other: object = None


def test_frozen_cyclic_garbage_waits_for_the_thaw_and_is_reclaimed_then() -> None:
    gc.collect()
    a, b = _Obj(), _Obj()
    a.other, b.other = b, a  # a cycle: only the cycle collector reclaims it
    ref = weakref.ref(a)
    gcpolicy.freeze_survivors()
    try:
        assert gc.get_freeze_count() > 0
        del a, b
        gc.collect()
        assert ref() is not None, "a full collection no longer walks frozen objects"
        assert gcpolicy.thaw_and_collect() >= 2
        assert gc.get_freeze_count() == 0 and ref() is None
    finally:
        gc.unfreeze()


async def test_the_loop_freezes_every_interval_and_thaws_once_per_thaw_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(gcpolicy, "freeze_survivors", lambda: calls.append("freeze"))
    monkeypatch.setattr(gcpolicy, "thaw_and_collect", lambda: calls.append("thaw") or 0)
    monkeypatch.setattr(gcpolicy, "FREEZE_EVERY", 0)
    now = [0.0]

    def clock() -> float:
        now[0] += 1000.0  # virtual: each look at the clock is 1,000 s later
        return now[0]

    task = asyncio.create_task(gcpolicy.run(clock=clock))
    for _ in range(50):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls[0] == "freeze", "the state loaded at start is frozen first"
    # THAW_EVERY is 3,600 s: with 1,000 s per clock read, a thaw comes every few rounds, each followed by
    # a freeze of what survived it
    assert "thaw" in calls and calls.count("freeze") > calls.count("thaw")
    for i, c in enumerate(calls):
        if c == "thaw":
            assert calls[i + 1] == "freeze"
