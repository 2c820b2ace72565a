"""coordinator.api.adminhttp.AttemptLimiter: failed token checks limited per source and over all sources."""

from __future__ import annotations

from coordinator.api.adminhttp import OVERALL, PER_SOURCE, AttemptLimiter

SOURCES = [f"198.51.100.{i}" for i in range(1, 201)]  #: 200 addresses, none failing often itself


def fail_round_robin(gate: AttemptLimiter, now: float, tries: int) -> list[bool]:
    """``tries`` attempts, each from the next address, each failing when it was let through."""
    let_in = []
    for i in range(tries):
        source = SOURCES[i % len(SOURCES)]
        ok = gate.may_try(source, now)
        if ok:
            gate.failed(source, now)
        let_in.append(ok)
    return let_in


def test_many_sources_together_reach_the_overall_limit() -> None:
    gate = AttemptLimiter()
    burst, rate = int(OVERALL[1]), OVERALL[0]
    assert burst < len(SOURCES) and burst / len(SOURCES) < PER_SOURCE[1]  # no single source is limited
    let_in = fail_round_robin(gate, 0.0, 200)
    assert let_in == [True] * burst + [False] * (200 - burst)
    # everybody is refused now, also an address never seen (an attacker with many addresses gains nothing)
    assert not gate.may_try("203.0.113.77", 0.0)
    # then the overall rate: 5 more per second, from anywhere
    assert sum(fail_round_robin(gate, 1.0, 200)) == int(rate)
    assert sum(fail_round_robin(gate, 3.0, 200)) == int(2 * rate)
    # failures stop; the overall bucket refills completely after burst / rate seconds
    later = 3.0 + burst / rate
    assert sum(fail_round_robin(gate, later, 200)) == burst


def test_one_source_is_limited_before_the_overall_limit() -> None:
    gate = AttemptLimiter()
    per = int(PER_SOURCE[1])
    let_in = []
    for _ in range(per + 5):
        ok = gate.may_try("192.0.2.66", 0.0)
        if ok:
            gate.failed("192.0.2.66", 0.0)
        let_in.append(ok)
    assert let_in == [True] * per + [False] * 5
    assert gate.may_try("192.0.2.7", 0.0)  # another address is not: the overall budget has room left
    assert gate.may_try("192.0.2.66", 1 / PER_SOURCE[0])  # one try back after 2 s


def test_checking_costs_nothing_only_failures_do() -> None:
    gate = AttemptLimiter()
    for _ in range(1000):  # successful checks (may_try without failed) never use up the budget
        assert gate.may_try("192.0.2.8", 0.0)
