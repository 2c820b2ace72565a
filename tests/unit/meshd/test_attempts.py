"""Upgrade attempts and sequenced rounds for one peer, on a virtual clock (meshd.attempts; the rules are
in the meshd.paths docstring). Nothing answers here: these are the schedules of a peer that stays
unreachable, which is where the timing matters."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from meshd.attempts import Attempts
from meshd.pathevents import PathConfig, PathEvent, SendKeepalives, SendProbes
from meshd.proto.endpoint import Endpoint

LAN: Endpoint = ("192.168.1.5", 41641)
PUB: Endpoint = ("203.0.113.7", 41641)
CFG = PathConfig()


@dataclass
class Clock:
    """Drives one Attempts on virtual time and records each decision with the moment it was made."""

    targets: tuple[Endpoint, ...] = (PUB, LAN)
    leads: bool = False
    now: float = 0.0
    out: list[tuple[float, PathEvent]] = field(default_factory=list)
    a: Attempts = field(init=False)

    def __post_init__(self) -> None:
        self.a = Attempts(
            "peer",
            CFG,
            leads=self.leads,
            targets=lambda: self.targets,
            public=lambda: tuple(t for t in self.targets if t != LAN),
            events=self,
        )

    def append(self, event: PathEvent) -> None:
        self.out.append((self.now, event))

    def run_until(self, end: float) -> None:
        while (due := min((t for t in self.a.timers() if t is not None), default=None)) is not None:
            if due > end:
                break
            self.now = max(self.now, due)
            self.a.handle_timer(self.now)
        self.now = end

    def first_probes(self) -> list[float]:
        return [t for t, e in self.out if isinstance(e, SendProbes) and e.first]

    def keepalives(self) -> list[tuple[float, tuple[Endpoint, ...]]]:
        return [(t, e.endpoints) for t, e in self.out if isinstance(e, SendKeepalives)]


def test_an_attempt_probes_every_interval_then_backs_off_doubling_up_to_the_cap() -> None:
    c = Clock()
    c.a.start(0.0)
    c.run_until(CFG.attempt_duration)
    probes = [t for t, e in c.out if isinstance(e, SendProbes)]
    assert probes == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5]), "a burst every probe_interval"
    assert c.out[0][1] == SendProbes("peer", (PUB, LAN), False, True), "global first; the call goes with it"
    c.run_until(400.0)
    starts = c.first_probes()
    gaps = [b - a - CFG.attempt_duration for a, b in itertools.pairwise(starts)]
    assert gaps[:7] == pytest.approx([1, 2, 4, 8, 16, 32, 60]), "exponential backoff capped at backoff_max"
    assert c.keepalives() == [], "no call-me-maybe went either way: never a sequenced round"


def test_a_synchronised_attempt_ends_at_the_latest_agreed_moment() -> None:
    c = Clock()
    c.a.start(10.0)
    c.a.synchronise(10.4)
    c.a.synchronise(10.2)  # the earlier of two calls does not move the end back
    assert c.a.until == pytest.approx(10.4 + CFG.attempt_duration) and c.a.synced
    c.a.stop()
    c.a.synchronise(20.0)
    assert not c.a.running, "without a running attempt a call changes nothing"


def test_the_side_that_leads_keeps_first_then_waits_quietly() -> None:
    c = Clock(leads=True)
    c.a.start(0.0)
    c.a.synchronise(0.0)
    c.run_until(CFG.attempt_duration)
    assert (c.a.round, c.a.keep, c.a.in_round) == (1, True, True)
    keep_for = CFG.seq_wait + CFG.attempt_duration + CFG.seq_grace
    c.run_until(CFG.attempt_duration + keep_for - 0.01)
    times = [t for t, _ in c.keepalives()]
    assert times[0] == pytest.approx(3.0) and all(ends == (PUB,) for _, ends in c.keepalives())
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx([CFG.seq_keepalive] * 7)
    assert not [t for t, e in c.out if isinstance(e, SendProbes) and t >= 3.0], "the keeper never probes"
    c.run_until(CFG.attempt_duration + keep_for)
    assert (c.a.round, c.a.keep) == (2, False), "roles alternate"
    quiet_from = c.now
    c.run_until(quiet_from + CFG.seq_wait - 0.01)
    assert [t for t, _ in c.out if t > quiet_from] == [], "the quiet side sends nothing while it waits"


def test_the_quiet_side_waits_then_clears_stale_flows_and_probes_without_a_call() -> None:
    c = Clock(leads=False)
    c.a.start(0.0)
    c.a.synchronise(0.0)
    c.run_until(CFG.attempt_duration)
    assert (c.a.round, c.a.keep) == (1, False)
    c.run_until(CFG.attempt_duration + CFG.seq_wait)
    after = [(t, e) for t, e in c.out if t >= CFG.attempt_duration]
    assert after == [
        (pytest.approx(35.0), SendKeepalives("peer", (PUB, LAN))),  # TTL-1 to every address we probed
        (pytest.approx(35.0), SendProbes("peer", (PUB, LAN), True, False)),  # immediate: no call-me-maybe
    ]
    assert not c.a.in_round and c.a.running and c.a.round == 1


def test_rounds_run_out_and_the_plain_backoff_resumes() -> None:
    c = Clock(leads=False)
    c.a.start(0.0)
    c.a.synchronise(0.0)
    c.run_until(3.0 + CFG.seq_wait + 3.0)  # round 1 (quiet), then its own attempt, unanswered
    assert (c.a.round, c.a.keep) == (2, True)
    c.run_until(c.now + CFG.seq_wait + CFG.attempt_duration + CFG.seq_grace)
    assert not c.a.in_round and c.a.next_attempt is not None, "seq_rounds used up: the usual backoff"
    assert CFG.seq_rounds == 2


def test_no_public_address_no_round() -> None:
    c = Clock(targets=(LAN,))
    c.a.start(0.0)
    c.a.synchronise(0.0)
    c.run_until(3.0)
    assert not c.a.in_round and c.a.next_attempt == pytest.approx(3.0 + CFG.backoff_initial)


def test_a_fresh_start_ends_rounds_and_resets_the_backoff() -> None:
    c = Clock(leads=True)
    c.a.start(0.0)
    c.a.synchronise(0.0)
    c.run_until(3.0)
    assert c.a.in_round
    c.a.end_rounds()
    c.a.fresh()
    c.a.start(c.now)
    assert (c.a.round, c.a.in_round, c.a.backoff) == (0, False, CFG.backoff_initial) and c.a.running


def test_nothing_to_probe_nothing_scheduled() -> None:
    c = Clock(targets=())
    c.a.start(0.0)
    assert c.out == [] and not c.a.running and all(t is None for t in c.a.timers())
