"""The per-peer path machine against an in-memory network on a virtual clock."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from pytest import approx

from meshd.paths import (
    Candidate,
    CandidateKind,
    Endpoint,
    PathConfig,
    PathKind,
    PeerPath,
    SendKeepalives,
    SendProbes,
    UseDirect,
    UseRelay,
)

LAN: Endpoint = ("192.168.1.20", 41641)
PUB: Endpoint = ("6.0.0.3", 41641)
PUB2: Endpoint = ("6.0.0.3", 50000)  # the same NAT after rebinding


@dataclass
class Route:
    """How a probe to one address is answered."""

    rtt: float
    answer_from: Endpoint | None = None  # None: from where it was sent
    up: bool = True


@dataclass
class Lab:
    """An in-memory network and a virtual clock driving one PeerPath."""

    path: PeerPath
    routes: dict[Endpoint, Route] = field(default_factory=dict)
    now: float = 0.0
    log: list[tuple[float, object]] = field(default_factory=list)
    probes: list[tuple[float, Endpoint]] = field(default_factory=list)
    _pending: list[tuple[float, int, Endpoint, Endpoint, float]] = field(default_factory=list)
    _seq: int = 0
    tick: Callable[[PeerPath, float], None] | None = None  # called every second (WireGuard polling)
    _next_tick: float = 1.0

    def drain(self) -> None:
        while (ev := self.path.next_event()) is not None:
            self.log.append((self.now, ev))
            if isinstance(ev, SendProbes):
                for dst in ev.endpoints:
                    self.probes.append((self.now, dst))
                    r = self.routes.get(dst)
                    if r is not None and r.up:
                        self._seq += 1
                        src = r.answer_from or dst
                        heapq.heappush(self._pending, (self.now + r.rtt, self._seq, dst, src, r.rtt))

    def run(self, until: float) -> None:
        """Advance virtual time to ``until``, delivering answers and firing timers in order."""
        self.drain()
        for _ in range(1_000_000):
            t_timer = self.path.next_timer()
            t_answer = self._pending[0][0] if self._pending else None
            t_tick = self._next_tick if self.tick else None
            nxt = min((t for t in (t_timer, t_answer, t_tick) if t is not None), default=None)
            if nxt is None or nxt > until:
                break
            self.now = max(self.now, nxt)
            if t_answer is not None and nxt == t_answer:
                _, _, dst, src, rtt = heapq.heappop(self._pending)
                self.path.probe_answered(dst, src, rtt, self.now)
            elif t_tick is not None and nxt == t_tick and self.tick is not None:
                self.tick(self.path, self.now)
                self._next_tick += 1.0
            else:
                self.path.handle_timer(self.now)
            self.drain()
        else:
            raise AssertionError("simulation did not settle")
        self.now = until

    def decisions(self) -> list[tuple[float, UseRelay | UseDirect]]:
        return [(t, e) for t, e in self.log if isinstance(e, UseRelay | UseDirect)]

    def last_decision(self) -> UseRelay | UseDirect:
        return self.decisions()[-1][1]


def make(
    routes: dict[Endpoint, Route] | None = None,
    cands: list[Candidate] | None = None,
    *,
    relay_up: bool = True,
) -> Lab:
    lab = Lab(PeerPath("peerkey", 0.0, relay_up=relay_up), routes=routes or {})
    lab.drain()
    if cands is not None:
        lab.path.set_candidates(cands, 0.0)
    return lab


def test_starts_on_relay_and_without_candidates_only_waits() -> None:
    lab = make()
    assert lab.log == [(0.0, UseRelay("peerkey", "start"))]
    assert lab.path.status.path is PathKind.RELAY
    assert lab.path.next_timer() is None


def test_answered_probe_goes_direct() -> None:
    lab = make({PUB: Route(rtt=0.02)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(1.0)
    assert lab.last_decision() == UseDirect("peerkey", PUB, 0.02, "probe answered")
    assert lab.path.status.path is PathKind.DIRECT
    assert lab.path.status.endpoint == PUB


def test_no_direct_endpoint_before_an_answer() -> None:
    lab = make({PUB: Route(rtt=0.02, up=False)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(30.0)
    assert not any(isinstance(e, UseDirect) for _, e in lab.log)
    assert lab.path.status.path is PathKind.RELAY


def test_prefers_lan_over_faster_public() -> None:
    lab = make(
        {LAN: Route(rtt=0.010), PUB: Route(rtt=0.002)},
        [Candidate(PUB, CandidateKind.PUBLIC), Candidate(LAN, CandidateKind.LAN)],
    )
    lab.run(2.0)
    assert lab.path.status.endpoint == LAN


def test_among_public_prefers_lower_latency() -> None:
    b: Endpoint = ("7.0.0.9", 41641)
    lab = make(
        {PUB: Route(rtt=0.050), b: Route(rtt=0.005)},
        [Candidate(PUB, CandidateKind.PUBLIC), Candidate(b, CandidateKind.PUBLIC)],
    )
    lab.run(2.0)
    assert lab.path.status.endpoint == b
    assert lab.path.status.rtt == 0.005


def test_lossy_link_still_goes_direct_on_a_later_probe() -> None:
    lab = make({PUB: Route(rtt=0.02, up=False)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(0.9)  # the first probes are lost
    lab.routes[PUB].up = True
    lab.run(2.0)  # a retransmission in the same attempt is answered
    assert lab.path.status.path is PathKind.DIRECT


def test_late_answer_is_ignored() -> None:
    lab = make({PUB: Route(rtt=2.5)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(20.0)
    assert lab.path.status.path is PathKind.RELAY
    # the same path answering in time is used
    lab.routes[PUB].rtt = 0.1
    lab.run(40.0)
    assert lab.path.status.path is PathKind.DIRECT


def test_heartbeat_loss_falls_back_to_relay_within_5s() -> None:
    lab = make({PUB: Route(rtt=0.02)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(10.0)
    assert lab.path.status.path is PathKind.DIRECT
    lab.routes[PUB].up = False  # the path dies at t=10
    lab.run(20.0)
    fallbacks = [(t, e) for t, e in lab.decisions() if isinstance(e, UseRelay) and t > 10.0]
    assert fallbacks, lab.log
    t, ev = fallbacks[0]
    assert t <= 15.0
    assert "heartbeat lost" in ev.reason
    assert lab.path.status.path is PathKind.RELAY


def test_heartbeats_keep_a_live_direct_path() -> None:
    lab = make({PUB: Route(rtt=0.02)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(300.0)
    assert [type(e) for _, e in lab.decisions()] == [UseRelay, UseDirect]
    beats = [t for t, dst in lab.probes if dst == PUB and t > 100.0]
    assert len(beats) >= 190  # about one a second


def test_rebinding_answer_from_new_address_is_verified_then_used() -> None:
    lab = make({PUB: Route(rtt=0.02)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(5.0)
    # the peer's NAT rebinds: probes to the old mapping are answered from a new port
    lab.routes[PUB].answer_from = PUB2
    lab.routes[PUB2] = Route(rtt=0.02)
    lab.run(15.0)
    assert lab.path.status.endpoint == PUB2
    direct = [e for _, e in lab.decisions() if isinstance(e, UseDirect)]
    assert direct[-1].endpoint == PUB2
    # PUB2 was probed itself before it was used
    first_use = next(t for t, e in lab.decisions() if isinstance(e, UseDirect) and e.endpoint == PUB2)
    assert any(dst == PUB2 and t < first_use for t, dst in lab.probes)
    # and there was no detour through the relay
    assert not any(isinstance(e, UseRelay) and t > 5.0 for t, e in lab.decisions())


def test_answer_from_unprobed_address_alone_never_sets_it() -> None:
    lab = make({PUB: Route(rtt=0.02, answer_from=PUB2)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(30.0)  # PUB2 never answers probes sent to it
    assert lab.path.status.path is PathKind.RELAY
    assert any(dst == PUB2 for _, dst in lab.probes)


def test_probe_received_from_new_address_is_probed_back() -> None:
    lab = make({PUB2: Route(rtt=0.03)}, [])
    lab.path.probe_received(PUB2, 0.5)
    lab.run(2.0)
    assert lab.path.status.endpoint == PUB2


def test_upgrade_backoff_never_stops() -> None:
    cfg = PathConfig()
    lab = make({}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(6 * 3600.0)
    times = sorted({t for t, _ in lab.probes})
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[-1] > 6 * 3600.0 - cfg.backoff_max - cfg.attempt_duration  # still probing after 6 h
    assert max(gaps) <= cfg.backoff_max + cfg.probe_interval
    assert max(gaps[-20:]) >= cfg.backoff_max  # and it did back off, to the cap


def test_new_candidates_retry_at_once_with_backoff_reset() -> None:
    lab = make({}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(600.0)  # deep in backoff
    lab.routes[LAN] = Route(rtt=0.001)
    lab.path.set_candidates([Candidate(PUB, CandidateKind.PUBLIC), Candidate(LAN, CandidateKind.LAN)], 600.0)
    lab.run(600.5)
    assert lab.path.status.endpoint == LAN


def test_relay_down_without_direct_path_is_none_and_retries_at_once() -> None:
    lab = make({}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(600.0)
    lab.path.relay_down(600.0)
    assert lab.path.status.path is PathKind.NONE
    lab.run(600.1)
    assert any(t == 600.0 for t, _ in lab.probes)
    lab.path.relay_up(601.0)
    assert lab.path.status.path is PathKind.RELAY


def test_a_new_peer_while_the_relay_is_down_is_none_not_relay() -> None:
    # WireGuard points at the relay proxy from the start, but with every relay link down nothing carries it
    lab = make({}, [Candidate(PUB, CandidateKind.PUBLIC)], relay_up=False)
    assert lab.log[0][1] == UseRelay("peerkey", "start")
    assert lab.path.status.path is PathKind.NONE
    lab.run(10.0)
    assert lab.path.status.path is PathKind.NONE, "attempts failing do not make the relay appear"
    lab.path.relay_up(10.0)
    assert lab.path.status.path is PathKind.RELAY


def test_with_the_relay_down_a_direct_path_shows_and_losing_it_means_none() -> None:
    lab = make({PUB: Route(rtt=0.02)}, [Candidate(PUB, CandidateKind.PUBLIC)], relay_up=False)
    lab.run(1.0)
    assert lab.path.status.path is PathKind.DIRECT
    lab.routes[PUB].up = False
    lab.run(6.0)
    assert lab.last_decision() == UseRelay("peerkey", f"heartbeat lost from {PUB[0]}:{PUB[1]}")
    assert lab.path.status.path is PathKind.NONE


def test_discovery_upgrades_to_a_better_path_while_direct() -> None:
    lab = make(
        {PUB: Route(rtt=0.02), LAN: Route(rtt=0.001, up=False)},
        [Candidate(PUB, CandidateKind.PUBLIC), Candidate(LAN, CandidateKind.LAN)],
    )
    lab.run(5.0)
    assert lab.path.status.endpoint == PUB
    lab.routes[LAN].up = True
    lab.run(5.0 + PathConfig().discovery_interval + 1.0)
    assert lab.path.status.endpoint == LAN
    assert lab.last_decision() == UseDirect("peerkey", LAN, 0.001, "better path")


def test_similar_latency_does_not_flap() -> None:
    b: Endpoint = ("7.0.0.9", 41641)
    lab = make(
        {PUB: Route(rtt=0.020), b: Route(rtt=0.018)},
        [Candidate(PUB, CandidateKind.PUBLIC), Candidate(b, CandidateKind.PUBLIC)],
    )
    lab.run(300.0)
    assert len([e for _, e in lab.decisions() if isinstance(e, UseDirect)]) == 1


def _fresh_handshakes(path: PeerPath, now: float) -> None:
    path.handshake(now - (now % 120.0), now)  # WireGuard re-handshakes every 2 minutes


def test_advancing_handshakes_keep_direct() -> None:
    lab = make({PUB: Route(rtt=0.02)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.tick = _fresh_handshakes
    lab.run(1000.0)
    assert lab.path.status.path is PathKind.DIRECT
    assert [type(e) for _, e in lab.decisions()] == [UseRelay, UseDirect]


def test_handshake_stall_falls_back_although_probes_answer() -> None:
    cfg = PathConfig()
    lab = make({PUB: Route(rtt=0.02)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.tick = lambda path, now: path.handshake(None, now)  # WireGuard never completes a handshake
    lab.run(cfg.handshake_stall + 10.0)
    stalls = [(t, e) for t, e in lab.decisions() if isinstance(e, UseRelay) and "stalled" in e.reason]
    assert stalls
    assert stalls[0][0] <= cfg.handshake_stall + 1.0
    # the stalled address is avoided although it keeps answering probes
    lab.run(cfg.handshake_stall + cfg.stall_penalty - 10.0)
    assert lab.path.status.path is PathKind.RELAY


def test_handshake_stall_after_it_worked() -> None:
    cfg = PathConfig()
    lab = make({PUB: Route(rtt=0.02)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.tick = _fresh_handshakes
    lab.run(500.0)
    lab.tick = lambda path, now: path.handshake(480.0, now)  # the last one was at 480
    lab.run(480.0 + cfg.handshake_stall + 2.0)
    assert lab.path.status.path is PathKind.RELAY
    t, ev = lab.decisions()[-1]
    assert isinstance(ev, UseRelay) and "stalled" in ev.reason
    assert 480.0 + cfg.handshake_stall <= t <= 480.0 + cfg.handshake_stall + 1.0


def test_stall_falls_over_to_another_live_direct_address() -> None:
    lab = make(
        {PUB: Route(rtt=0.02), LAN: Route(rtt=0.001)},
        [Candidate(PUB, CandidateKind.PUBLIC), Candidate(LAN, CandidateKind.LAN)],
    )
    lab.tick = lambda path, now: path.handshake(None, now)
    lab.run(PathConfig().handshake_stall + 5.0)
    assert lab.path.status.endpoint == PUB  # LAN stalled and is avoided; PUB was alive


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=50.0),
            st.sampled_from(["up", "down", "rtt", "relay_down", "relay_up", "cands"]),
            st.floats(min_value=0.0005, max_value=3.0),
        ),
        max_size=20,
    )
)
def test_any_sequence_keeps_invariants(script: list[tuple[float, str, float]]) -> None:
    """Whatever happens: direct only to an address that answered a probe sent to it, timers in future."""
    lab = make(
        {PUB: Route(rtt=0.02), LAN: Route(rtt=0.003)},
        [Candidate(PUB, CandidateKind.PUBLIC), Candidate(LAN, CandidateKind.LAN)],
    )
    answered: set[Endpoint] = set()
    orig = lab.path.probe_answered

    def spy(sent_to: Endpoint, frm: Endpoint, rtt: float, now: float) -> None:
        if sent_to == frm and rtt <= lab.path.config.late_after:
            answered.add(sent_to)
        orig(sent_to, frm, rtt, now)

    lab.path.probe_answered = spy  # type: ignore[method-assign,assignment]
    for at, what, x in sorted(script):
        lab.run(max(at, lab.now))
        route = lab.routes[LAN if x < 1.0 else PUB]
        if what == "up":
            route.up = True
        elif what == "down":
            route.up = False
        elif what == "rtt":
            route.rtt = x
        elif what == "relay_down":
            lab.path.relay_down(lab.now)
        elif what == "relay_up":
            lab.path.relay_up(lab.now)
        else:
            lab.path.set_candidates([Candidate(PUB, CandidateKind.PUBLIC)], lab.now)
        lab.drain()
        timer = lab.path.next_timer()
        assert timer is None or timer >= lab.now - 1e-9 or lab.path.status.path is not PathKind.DIRECT
    lab.run(lab.now + 120.0)
    for _, ev in lab.log:
        if isinstance(ev, UseDirect):
            assert ev.endpoint in answered
    assert lab.path.next_timer() is not None  # it never stops trying or heart-beating


def test_call_me_maybe_starts_an_attempt_at_once_deep_in_backoff() -> None:
    lab = make({}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(600.0)  # deep in backoff: next attempt up to a minute away
    lab.routes[PUB] = Route(rtt=0.02)  # the peer's NAT opens because it probes us at the same time
    before = len(lab.probes)
    lab.path.peer_asked(600.0)
    lab.run(600.1)
    assert len(lab.probes) > before and lab.probes[before][0] == 600.0
    assert lab.path.status.endpoint == PUB


def test_call_me_maybe_during_an_attempt_probes_every_candidate_at_once() -> None:
    """Issue 15: not at the attempt's next tick (up to probe_interval later); the punch (meshd.nat.punch)
    holds these probes until the moment agreed with the peer."""
    lab = make({}, [Candidate(PUB, CandidateKind.PUBLIC), Candidate(LAN, CandidateKind.LAN)])
    lab.run(0.2)  # the attempt's first probes went out at 0.0, the next tick is at 0.5
    before = len(lab.probes)
    lab.path.peer_asked(0.2, at=0.45)
    lab.drain()
    assert sorted(e for _, e in lab.probes[before:]) == sorted([PUB, LAN])
    assert all(t == 0.2 for t, _ in lab.probes[before:])


def test_call_me_maybe_on_direct_sends_nothing_extra() -> None:
    lab = make({PUB: Route(rtt=0.01)}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(0.5)
    assert lab.path.status.path is PathKind.DIRECT
    n = len(lab.probes)
    lab.path.peer_asked(0.5)
    lab.drain()
    assert len(lab.probes) == n


# --- sequenced rounds (routers without an input firewall, links too fast for probes to cross) ----------


def _keepalives(lab: Lab) -> list[float]:
    return [t for t, e in lab.log if isinstance(e, SendKeepalives)]


def _make_seq(leads: bool, cands: list[Candidate]) -> Lab:
    lab = Lab(PeerPath("peerkey", 0.0, relay_up=True, leads=leads))
    lab.drain()
    lab.path.set_candidates(cands, 0.0)
    lab.path.peer_asked(0.0)  # the peer probes in the same attempt (its call-me-maybe arrived)
    return lab


def test_a_failed_attempt_the_peer_did_not_join_is_retried_plainly() -> None:
    lab = Lab(PeerPath("peerkey", 0.0, relay_up=True, leads=True))
    lab.path.set_candidates([Candidate(PUB, CandidateKind.PUBLIC)], 0.0)
    lab.run(PathConfig().attempt_duration + 0.01)
    assert lab.path.seq_round is None and not _keepalives(lab)


def test_follower_stays_quiet_until_the_routers_entry_expired_then_probes_then_keeps() -> None:
    cfg = PathConfig()
    lab = _make_seq(False, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(cfg.attempt_duration)  # the first attempt gets no answer
    assert lab.path.seq_round == (1, False)
    n = len(lab.probes)
    lab.run(cfg.attempt_duration + cfg.seq_wait - 0.01)
    assert len(lab.probes) == n and not _keepalives(lab), "quiet: nothing leaves towards the peer"
    lab.run(cfg.attempt_duration + cfg.seq_wait + 0.01)
    assert lab.probes[n][0] == approx(cfg.attempt_duration + cfg.seq_wait), "probes once the wait is over"
    lab.run(2 * cfg.attempt_duration + cfg.seq_wait + 0.01)  # that attempt failed too: now we keep
    assert lab.path.seq_round == (2, True)
    n = len(lab.probes)
    keep_end = 2 * cfg.attempt_duration + 2 * cfg.seq_wait + cfg.attempt_duration + cfg.seq_grace
    lab.run(keep_end - 0.01)
    assert len(lab.probes) == n, "the keeper sends no probe that could reach the peer's router"
    kept = _keepalives(lab)
    assert len(kept) >= cfg.seq_wait / cfg.seq_keepalive
    assert max(b - a for a, b in itertools.pairwise(kept)) <= cfg.seq_keepalive + 1e-9
    lab.run(keep_end + cfg.backoff_initial + 0.01)
    assert lab.path.seq_round is None and len(lab.probes) > n, "rounds used up: the usual backoff"


def test_leader_keeps_first() -> None:
    cfg = PathConfig()
    lab = _make_seq(True, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(cfg.attempt_duration + 0.01)
    assert lab.path.seq_round == (1, True)
    assert _keepalives(lab) == [approx(cfg.attempt_duration)]
    assert next(e for _, e in lab.log if isinstance(e, SendKeepalives)).endpoints == (PUB,)


def test_keeper_answered_by_the_peer_probes_back_at_once_and_goes_direct() -> None:
    cfg = PathConfig()
    lab = _make_seq(True, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(20.0)
    assert lab.path.seq_round == (1, True)
    lab.routes[PUB] = Route(rtt=0.001)  # the peer's quiet wait is over: its probe got through
    lab.path.probe_received(PUB, 20.0)
    lab.drain()
    sent = [e for t, e in lab.log if t == 20.0 and isinstance(e, SendProbes)]
    assert sent and sent[-1].immediate, "no call-me-maybe first: the peer's NAT is open to us"
    lab.run(20.1)
    assert lab.path.status.endpoint == PUB and lab.path.seq_round is None
    assert cfg.seq_rounds == 2


def test_a_call_me_maybe_during_a_round_joins_the_peers_attempt_and_so_do_new_candidates() -> None:
    # a peer in our round never calls (the quiet side's probes go without one): this peer restarted
    lab = _make_seq(True, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(10.0)
    lab.path.peer_asked(10.0, at=10.25)
    lab.drain()
    assert lab.path.seq_round is None and lab.probes[-1] == (10.0, PUB)
    lab.run(10.25 + lab.path.config.attempt_duration + 0.01)  # it ends at the agreed moment + duration
    assert lab.path.seq_round == (1, True), "both sides ran it: the same round starts on both"
    lab.run(20.0)
    lab.path.set_candidates([Candidate(PUB2, CandidateKind.PUBLIC)], 20.0)
    lab.drain()
    assert lab.path.seq_round is None and lab.probes[-1] == (20.0, PUB2)


def test_lan_only_candidates_need_no_rounds() -> None:
    lab = _make_seq(False, [Candidate(LAN, CandidateKind.LAN)])
    lab.run(10.0)
    assert lab.path.seq_round is None and not _keepalives(lab)


def test_global_addresses_are_probed_before_private_ones() -> None:
    # a Linux NAT gives a new flow the newest mapping of its source port, even an expired one not yet
    # collected; a probe to the expired flow's own (global) address first frees it
    private: Endpoint = ("192.168.2.10", 41641)
    lab = _make_seq(False, [Candidate(private, CandidateKind.PUBLIC), Candidate(PUB, CandidateKind.PUBLIC)])
    lab.drain()
    first = next(e for _, e in lab.log if isinstance(e, SendProbes))
    assert first.endpoints == (PUB, private)


def test_the_quiet_side_first_makes_its_router_forget_every_stale_flow_then_probes_without_a_call() -> None:
    # TTL-1 probes to every address probed before (the LAN one too: a stale flow to it would hand the
    # moved port on to the new flow), then ordinary probes that need no call-me-maybe
    cfg = PathConfig()
    lab = _make_seq(False, [Candidate(PUB, CandidateKind.PUBLIC), Candidate(LAN, CandidateKind.LAN)])
    lab.run(cfg.attempt_duration + cfg.seq_wait + 0.01)
    end = cfg.attempt_duration + cfg.seq_wait
    at_end = [e for t, e in lab.log if t == approx(end) and isinstance(e, (SendKeepalives, SendProbes))]
    assert isinstance(at_end[0], SendKeepalives) and set(at_end[0].endpoints) == {PUB, LAN}
    assert (
        isinstance(at_end[1], SendProbes) and at_end[1].immediate and set(at_end[1].endpoints) == {PUB, LAN}
    )
    lab.run(end + 1.01)
    later = [e for t, e in lab.log if t > end and isinstance(e, SendProbes)]
    assert later and all(e.immediate for e in later), "no call-me-maybe: the keeper must not probe back"


def test_a_probe_from_the_peer_during_an_attempt_is_answered_with_a_probe_at_once_and_only_once() -> None:
    """Issue 15: our first probe may have hit the peer's NAT before the peer's own probe opened it; its
    probe arriving says the NAT is open now: probe back at once, not at the next tick (0.5 s later)."""
    lab = make({}, [Candidate(PUB, CandidateKind.PUBLIC)])
    lab.run(0.1)  # the attempt's first probe went out at 0.0 and was lost
    assert [t for t, _ in lab.probes] == [0.0]
    lab.routes[PUB] = Route(rtt=0.01)
    lab.path.probe_received(PUB, 0.1)
    lab.path.probe_received(PUB, 0.12)  # once per address per attempt: no probe ping-pong
    lab.run(0.2)
    assert lab.probes == [(0.0, PUB), (0.1, PUB)]
    assert lab.path.status.path is PathKind.DIRECT and lab.decisions()[-1][0] == approx(0.11)
