"""Token buckets per key (sender node, source address): sans-IO, the caller passes ``now``."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class TokenBuckets(Generic[K]):
    """``rate`` tokens per second up to ``burst`` per key; at most ``max_keys`` keys are remembered
    (beyond that, keys whose bucket has refilled, i.e. idle ones, are forgotten)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[K, tuple[float, float]] = {}  #: key -> (tokens, time of the last refill)

    def allow(self, key: K, now: float) -> bool:
        """Take one token for ``key``; False when it has none left."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._buckets) > self.max_keys:
            full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
            for k in full:
                del self._buckets[k]
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True

    def peek(self, key: K, now: float) -> bool:
        """Would ``allow`` succeed now? Takes nothing (a check before work that only failures pay for)."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate) >= 1
