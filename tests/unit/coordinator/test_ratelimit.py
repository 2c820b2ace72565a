"""coordinator.ratelimit: a burst, then the rate; idle keys are forgotten once over the bound."""

from __future__ import annotations

from coordinator.ratelimit import TokenBuckets


def test_a_burst_then_the_rate() -> None:
    b: TokenBuckets[str] = TokenBuckets(rate=2.0, burst=3.0)
    assert [b.allow("x", 0.0) for _ in range(4)] == [True, True, True, False]
    assert b.allow("y", 0.0)  # keys are independent
    assert not b.allow("x", 0.4) and b.allow("x", 0.9)  # one token back after 0.5 s


def test_the_remembered_keys_are_bounded() -> None:
    b: TokenBuckets[int] = TokenBuckets(rate=1.0, burst=1.0, max_keys=10)
    for k in range(50):
        b.allow(k, float(k))  # each key's bucket has refilled by the time the next arrives
    assert len(b._buckets) <= 11
