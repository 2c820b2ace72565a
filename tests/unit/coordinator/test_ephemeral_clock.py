"""Which ephemeral nodes are due for removal (coordinator/ephemeral.py, sans-IO), in virtual time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from coordinator.ephemeral import OfflineClock, tick


def test_a_node_offline_for_the_timeout_is_due_and_one_back_online_is_not() -> None:
    clock = OfflineClock(timeout=180)
    assert clock.due({1: False, 2: False, 3: True}, now=0) == []
    assert clock.due({1: False, 2: True, 3: True}, now=100) == []  # 2 came back: its clock restarts
    assert clock.due({1: False, 2: False, 3: True}, now=179) == []
    assert clock.due({1: False, 2: False, 3: True}, now=180) == [1]
    assert clock.due({1: False, 2: False, 3: True}, now=358) == [1]
    assert clock.due({1: False, 2: False, 3: True}, now=359) == [1, 2]


def test_removed_nodes_are_forgotten() -> None:
    clock = OfflineClock(timeout=10)
    clock.due({1: False}, now=0)
    clock.due({}, now=5)
    assert clock.due({1: False}, now=12) == []  # enrolled again under the same id: counts from now
    assert clock.due({1: False}, now=22) == [1]


def test_the_check_interval_scales_with_the_timeout() -> None:
    assert tick(180) == 5.0 and tick(1) == 0.2 and tick(10) == 1.0


@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=0, max_value=50)), min_size=1, max_size=40))
def test_due_only_after_an_unbroken_offline_stretch_of_the_timeout(steps: list[tuple[bool, float]]) -> None:
    clock = OfflineClock(timeout=30)
    now = 0.0
    offline_since: float | None = None
    for online, gap in steps:
        now += gap
        if online:
            offline_since = None
        elif offline_since is None:
            offline_since = now
        due = clock.due({7: online}, now)
        assert due == ([7] if offline_since is not None and now - offline_since >= 30 else [])
