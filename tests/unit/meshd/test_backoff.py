"""meshd's reconnect backoff (meshd.session.Backoff): jittered doubling after failures, a spread first
reconnect after a restart close, and retries that stay spread over the herd's window in a large mesh."""

from __future__ import annotations

from meshd import session
from meshd.proto.netmap import CloseCode


def test_failures_double_the_delay_with_jitter_up_to_the_cap() -> None:
    b = session.Backoff()
    waits = [b.next(None, 10) for _ in range(12)]
    assert session.RECONNECT_MIN * 0.5 <= waits[0] <= session.RECONNECT_MIN * 1.5
    assert all(w <= session.RECONNECT_MAX * 1.5 for w in waits)
    assert b.delay == session.RECONNECT_MAX


def test_a_restart_close_spreads_the_first_reconnect_over_the_mesh_window() -> None:
    small = [session.Backoff().next(CloseCode.RESTART, 100) for _ in range(200)]
    assert max(small) <= session.RECONNECT_MIN
    large = [session.Backoff().next(CloseCode.RESTART, 10_000) for _ in range(2000)]
    window = 10_000 / session.RECONNECT_RATE
    assert max(large) <= window and max(large) > 0.9 * window  # uniform over the whole window
    assert abs(sum(large) / len(large) - window / 2) < 1.0


def test_retries_after_a_restart_stay_brisk_in_a_small_mesh() -> None:
    b = session.Backoff()
    b.next(CloseCode.RESTART, 100)
    waits = [b.next(None, 100) for _ in range(session.RESTART_ATTEMPTS)]
    assert max(waits) <= session.RESTART_RETRY_MAX * 1.5, "the coordinator is expected back soon"


def test_retries_after_a_restart_stay_spread_in_a_large_mesh() -> None:
    """10,000 nodes retrying every <= 3 s while the coordinator starts would be 3,300 connects a second;
    spread over the herd's window they stay near RECONNECT_RATE."""
    window = 10_000 / session.RECONNECT_RATE
    waits: list[float] = []
    for _ in range(200):
        b = session.Backoff()
        b.next(CloseCode.RESTART, 10_000)
        waits.extend(b.next(None, 10_000) for _ in range(3))
    assert min(waits) >= session.RECONNECT_MIN and max(waits) <= window
    assert sum(waits) / len(waits) > window / 3, "not bunched at the start of the window"
    b = session.Backoff()
    b.next(CloseCode.RESTART, 10_000)
    for _ in range(session.RESTART_ATTEMPTS):
        b.next(None, 10_000)
    assert b.next(None, 10_000) <= session.RECONNECT_MIN * 1.5, "then the usual doubling from the start"
