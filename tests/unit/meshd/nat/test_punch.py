"""Call-me-maybe timing (meshd/nat/punch.py) on a virtual clock: when probes leave, and when we call."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pytest import approx

from meshd.nat.punch import (
    CMM_MIN_INTERVAL,
    GATHER_TIMEOUT,
    MAX_PUNCH_WAIT,
    PUNCH_DELAY,
    Call,
    Probe,
    Punch,
    PunchEvent,
    Restart,
)
from meshd.proto.endpoint import Endpoint

A: Endpoint = ("6.0.0.3", 41641)
B: Endpoint = ("192.168.1.20", 41641)
WALL = 1_767_225_600.0  # the wall clock reads WALL + now (plus a skew where a test says so)


class Clock:
    """Drives one Punch: advances virtual time, firing its timers on the way, and records its events."""

    def __init__(self, punch: Punch, now: float = 0.0) -> None:
        self.punch, self.now = punch, now
        self.events: list[tuple[float, PunchEvent]] = []

    def drain(self) -> list[PunchEvent]:
        out = []
        while (ev := self.punch.next_event()) is not None:
            out.append(ev)
            self.events.append((self.now, ev))
        return out

    def run_until(self, until: float) -> list[PunchEvent]:
        out = self.drain()
        while (t := self.punch.next_timer()) is not None and t <= until:
            self.now = max(self.now, t)
            self.punch.handle_timer(self.now)
            out += self.drain()
        self.now = until
        return out


def gathered(*peers: str, direct: set[str] | None = None) -> tuple[Punch, Clock]:
    """A Punch whose STUN answers are in, with ``peers`` known (``direct`` ones on a direct path)."""
    on_direct = direct if direct is not None else set()
    punch = Punch(lambda peer: peer in on_direct)
    for p in peers:
        punch.add(p)
    punch.start(0.0)
    punch.gathered()
    clock = Clock(punch)
    clock.drain()  # the Restarts of gathering
    return punch, clock


def test_a_new_attempt_calls_the_peer_and_holds_its_probes_until_the_moment_proposed() -> None:
    punch, clock = gathered("p")
    punch.probe("p", [A, B], now=0.0)
    assert clock.drain() == [Call("p", PUNCH_DELAY)]
    assert clock.run_until(PUNCH_DELAY - 0.01) == []
    assert clock.run_until(1.0) == [Probe("p", (A, B))]  # global addresses first
    assert clock.events[-1][0] == PUNCH_DELAY


def test_one_call_per_attempt_and_no_more_than_one_per_two_seconds() -> None:
    punch, clock = gathered("p")
    punch.probe("p", [A], now=0.0)
    clock.run_until(0.5)
    punch.probe("p", [A], now=0.5)
    assert clock.drain() == [Probe("p", (A,))]
    punch.probe("p", [A], now=CMM_MIN_INTERVAL + 0.5)
    assert clock.drain() == [Probe("p", (A,))], "the running attempt was called already"
    punch.probe("p", [A], now=CMM_MIN_INTERVAL - 0.01 + 0.0, first=True)  # the next attempt, too soon
    assert clock.drain() == [Probe("p", (A,))]
    punch.probe("p", [A], now=CMM_MIN_INTERVAL)  # a later probe of that attempt calls once allowed
    assert clock.drain() == [Call("p", CMM_MIN_INTERVAL + PUNCH_DELAY)]
    clock.run_until(CMM_MIN_INTERVAL + 1.0)
    punch.probe("p", [A], now=2 * CMM_MIN_INTERVAL + 1.0)
    assert clock.drain() == [Probe("p", (A,))]


def test_a_peer_on_a_direct_path_is_never_called() -> None:
    punch, clock = gathered("p", direct={"p"})
    punch.probe("p", [A], now=10.0)
    assert clock.drain() == [Probe("p", (A,))]


def test_the_peers_call_suppresses_ours_and_its_moment_is_used() -> None:
    punch, clock = gathered("p")
    clock.now = 5.0
    punch.called("p", at=WALL + 5.0 + 0.4, now=5.0, wall=WALL + 5.0)
    # the peer may not know our addresses yet: told once, with the moment it proposed (issue 15)
    assert clock.drain() == [Restart("p", by_peer=True, at=approx(5.4)), Call("p", approx(5.4))]
    punch.called("p", at=WALL + 5.0 + 0.4, now=5.0, wall=WALL + 5.0)
    assert clock.drain() == [Restart("p", by_peer=True, at=approx(5.4))], "only once"
    punch.probe("p", [A], now=5.0, first=True)  # the attempt the Restart started
    assert clock.drain() == []  # held for the peer's moment, and no call back
    assert clock.run_until(6.0) == [Probe("p", (A,))]
    assert clock.events[-1][0] == approx(5.4)
    punch.probe("p", [A], now=6.0)
    assert clock.drain() == [Probe("p", (A,))], "within 2 s of the peer's call: no call of ours"


def test_crossing_calls_agree_on_the_later_moment_on_both_sides() -> None:
    # x calls at 0.00 (moment 0.25), y at 0.10 (moment 0.35) by one shared wall clock; each hears the other
    x, cx = gathered("y")
    y, cy = gathered("x")
    x.probe("y", [A], now=0.0)
    (call_x,) = cx.drain()
    cy.now = 0.1
    y.probe("x", [B], now=0.1)
    (call_y,) = cy.drain()
    assert isinstance(call_x, Call) and isinstance(call_y, Call)
    x_at, y_at = WALL + call_x.at, WALL + call_y.at  # both clocks: wall = WALL + now
    cx.now = 0.15
    x.called("y", y_at, now=0.15, wall=WALL + 0.15)
    y.called("x", x_at, now=0.15, wall=WALL + 0.15)
    cx.run_until(2.0)
    cy.run_until(2.0)
    sent_x = [t for t, e in cx.events if isinstance(e, Probe)]
    sent_y = [t for t, e in cy.events if isinstance(e, Probe)]
    # (float Unix times near 1.8e9 carry about 0.2 µs of rounding)
    assert sent_x == [approx(0.35)] and sent_y == [approx(0.35)], "both probe at the later moment"


def test_a_moment_in_the_past_means_now_and_one_far_ahead_waits_at_most_max_punch_wait() -> None:
    punch, clock = gathered("p", "q")
    punch.called("p", at=WALL - 30.0, now=0.0, wall=WALL)
    punch.called("q", at=WALL + 3600.0, now=0.0, wall=WALL)
    punch.probe("p", [A], now=0.0)
    punch.probe("q", [B], now=0.0)
    assert [e for e in clock.drain() if isinstance(e, Probe)] == [Probe("p", (A,))]
    clock.run_until(10.0)
    q_sent = [t for t, e in clock.events if e == Probe("q", (B,))]
    assert q_sent == [MAX_PUNCH_WAIT]


@given(
    skew=st.floats(-1e6, 1e6),
    ahead=st.floats(-1e9, 1e9),
)
def test_whatever_the_peers_clock_says_probes_wait_between_zero_and_max_punch_wait(
    skew: float, ahead: float
) -> None:
    punch, clock = gathered("p")
    clock.now = 100.0
    punch.called("p", at=WALL + skew + ahead, now=100.0, wall=WALL + skew)
    punch.probe("p", [A], now=100.0)
    clock.run_until(200.0)
    (t,) = [t for t, e in clock.events if isinstance(e, Probe)]
    assert 100.0 <= t <= 100.0 + MAX_PUNCH_WAIT


def test_probes_are_held_until_gathered_then_every_peer_without_a_direct_path_restarts() -> None:
    punch = Punch(lambda peer: peer == "d")
    for p in ("p", "d"):
        punch.add(p)
    punch.start(0.0)
    clock = Clock(punch)
    punch.probe("p", [A], now=0.0)
    assert clock.drain() == []  # our public address is unknown: the peer could not answer us
    clock.now = 0.4
    punch.gathered()
    assert clock.drain() == [Restart("p")]
    punch.probe("p", [A], now=0.4)  # the fresh attempt calls first, though probes were asked before
    assert clock.drain() == [Call("p", 0.4 + PUNCH_DELAY)]
    assert clock.run_until(1.0) == [Probe("p", (A,))]


def test_without_stun_answers_probing_starts_after_the_gather_timeout() -> None:
    punch = Punch(lambda peer: False)
    punch.add("p")
    punch.start(10.0)
    clock = Clock(punch, now=10.0)
    punch.probe("p", [A], now=10.0)
    assert punch.next_timer() == 10.0 + GATHER_TIMEOUT
    # the probes held for gathering: the peer is called at once, not at the path machine's next tick
    assert clock.run_until(10.0 + GATHER_TIMEOUT) == [Restart("p"), Call("p", 12.0 + PUNCH_DELAY)]
    assert punch.is_gathered
    assert clock.run_until(13.0) == [Probe("p", (A,))]
    assert clock.events[-1][0] == approx(12.0 + PUNCH_DELAY)


def test_probes_held_for_stun_answers_are_called_for_the_moment_the_answers_arrive() -> None:
    """Issue 15: gathering ends, the peer hears a moment at once; held probes leave PUNCH_DELAY later."""
    punch = Punch(lambda peer: False)
    punch.add("p")
    punch.add("q")
    punch.start(0.0)
    clock = Clock(punch)
    punch.probe("p", [A, B], now=0.1)
    assert clock.drain() == []
    clock.run_until(0.4)
    punch.gathered(0.4)  # the STUN answer arrived
    # q held nothing (its candidates are not known yet): it hears ours at once all the same
    assert clock.drain() == [
        Restart("p"),
        Restart("q"),
        Call("p", 0.4 + PUNCH_DELAY),
        Call("q", 0.4 + PUNCH_DELAY),
    ]
    assert clock.run_until(1.0) == [Probe("p", (A, B))]
    assert clock.events[-1][0] == approx(0.4 + PUNCH_DELAY)


def test_our_new_addresses_reach_every_peer_without_a_direct_path_with_a_fresh_call() -> None:
    punch, clock = gathered("p", "d", direct={"d"})
    punch.probe("p", [A], now=0.0)
    clock.drain()
    clock.run_until(0.5)
    punch.candidates_changed()
    assert clock.drain() == [Restart("p")]
    punch.probe("p", [A], now=0.5)
    assert clock.drain() == [Call("p", 0.5 + PUNCH_DELAY)], "a new moment, even within 2 s of the last"


def test_the_peers_new_candidates_get_a_new_moment() -> None:
    punch, clock = gathered("p")
    punch.probe("p", [A], now=0.0)
    clock.run_until(0.5)
    punch.peer_candidates_changed("p")
    punch.probe("p", [A, B], now=0.5)
    assert clock.drain() == [Call("p", 0.5 + PUNCH_DELAY)]


def test_a_peer_that_left_is_forgotten() -> None:
    punch, clock = gathered("p")
    punch.probe("p", [A], now=0.0)
    clock.drain()
    punch.remove("p")
    assert punch.next_timer() is None
    punch.probe("p", [A], now=1.0)
    punch.called("p", WALL, now=1.0, wall=WALL)
    assert clock.run_until(5.0) == []


def test_a_peer_that_called_before_our_stun_answers_hears_our_addresses_with_its_moment() -> None:
    punch = Punch(lambda peer: False)
    punch.add("p")
    punch.start(0.0)
    clock = Clock(punch)
    punch.called("p", at=WALL + 0.3, now=0.1, wall=WALL + 0.1)  # moment 0.3, our STUN not answered yet
    assert clock.drain() == [Restart("p", by_peer=True, at=approx(0.3))], "no addresses worth sending yet"
    punch.gathered(0.2)
    assert clock.drain() == [Restart("p"), Call("p", approx(0.3))], "the agreed moment: nothing moves"
    punch.called("p", at=WALL + 0.3, now=0.21, wall=WALL + 0.21)  # its answer to ours: no third call
    assert [e for e in clock.drain() if isinstance(e, Call)] == []
