"""Which way packets to one peer go: relay, direct, or none (sans-IO).

One :class:`PeerPath` per peer decides where that peer's WireGuard endpoint points. It owns no socket,
clock or task: the daemon feeds it what happened (a probe was answered, candidates changed, the relay
came up, WireGuard's last handshake) together with ``now`` and drains the decisions it makes with
:meth:`PeerPath.next_event`; it sleeps until :meth:`PeerPath.next_timer` and then calls
:meth:`PeerPath.handle_timer`. ``now`` is any monotonic clock in seconds (tests use a virtual one).
Its upgrade attempts and sequenced rounds are a sans-IO piece of their own (:mod:`meshd.attempts`); the
configuration and decision types are in :mod:`meshd.pathevents` (re-exported here).

The rules (docs/design.md §2.5 "Then direct"):

* Every peer starts on the relay. Without a direct path the status says ``relay`` only while the relay
  is up (``relay_up`` at creation, then :meth:`PeerPath.relay_up` / :meth:`PeerPath.relay_down`), and
  ``none`` otherwise: WireGuard may point at the relay proxy, but nothing carries the packets.
* Whenever the peer is not on a direct path the machine runs upgrade
  *attempts*: bursts of probes to every candidate (``probe_interval`` apart, for ``attempt_duration``).
  An attempt that gets no answer is retried after an exponential backoff capped at ``backoff_max`` and
  never abandoned; new candidates (or losing the relay) start an attempt at once with the backoff reset.
  This mirrors ICE connectivity checks (RFC 8445 §6.1.4, §7.2.5) without its nomination dance: both
  sides probe at once, which is what opens the NATs.
* A direct endpoint is set only after a probe *to that address* was answered (RFC 8445 §7.2.5.2.1: a
  check is valid only if the response comes from where the request went). An answer from another
  address (a NAT rebinding, a peer-reflexive address, RFC 8445 §7.2.5.3.1) makes that address a
  candidate which is probed at once, and used when it answers in turn.
* Choice among answered addresses: IPv4 before IPv6, LAN before public, then lowest round-trip time; a
  path in the same class replaces the current one only when it is clearly faster (``switch_ratio``),
  to avoid flapping.
* On a direct path the current endpoint gets a heartbeat probe every ``heartbeat_interval``; with no
  answer for ``dead_after`` seconds the path is dead and the peer goes to another live direct address
  or back to the relay (with the defaults, within 3 s of the last answer, so within 5 s of a failure).
  All candidates are re-probed every ``discovery_interval`` to find a better path.
* A direct path whose WireGuard handshake does not advance for ``handshake_stall`` seconds (while
  probes still answer, e.g. a firewall that passes probes but not WireGuard, or a peer that did not
  switch) falls back to the relay and that address is avoided for ``stall_penalty`` seconds (or until
  the candidates change). WireGuard renews its session at least every REKEY_AFTER_TIME (120 s) while
  packets flow and rejects a session older than REJECT_AFTER_TIME (180 s) (WireGuard paper §6.1), so
  a handshake older than 185 s on a path that carries keepalives means the path does not work.
* Answers whose round-trip time exceeds ``late_after`` are too late to trust and are ignored.
* A probe received while no attempt runs starts one at once, and probes to where a peer's probe came
  from go out at once (``SendProbes.immediate``): that peer's NAT is open to us already.

Sequenced rounds (routers without an input firewall). Such a router turns a probe that arrives before its
own host sent anything to the prober into a conntrack entry for itself; the host's flow then leaves from
another port, and the peer's packets from that port hit the same fate on the other router. Unless both
first probes cross in flight (tens of microseconds on a LAN-speed link: it never happens at 0 ms) every
flow between the two public addresses is taken. Only expiry frees them (Linux: 30 s for unreplied UDP),
and only one side's entry may expire. So when an attempt gets no answer at all, up to ``seq_rounds``
rounds follow (when a call-me-maybe went either way during it, so the peer probed too; else a plain retry
first), roles alternating and fixed by ``leads`` (the side with the lower node key keeps first,
the side that probes first in a synchronised punch). Both sides must start the same round at the same
moment: a call-me-maybe (at most one per attempt, :mod:`meshd.nat.punch`) anchors the attempt's end on both
sides at ``attempt_duration`` after the moment it agreed (the later one if both called):

* the *keeper* sends ``SendKeepalives`` (probes with a TTL of 1) to the peer's public candidates every
  ``seq_keepalive`` seconds for ``seq_wait + attempt_duration + seq_grace``: they refresh its own router's
  mapping (conntrack refreshes an entry before the TTL check drops the packet) and never reach the
  peer's router, whose entry for us expires;
* the *quiet* side sends nothing to the peer for ``seq_wait`` seconds (its own remapped flows expire),
  then sends TTL-1 probes to every address it probed (a Linux NAT gives a new flow the port of the newest
  flow of the same source, even an expired one it has not collected yet, so a stale flow to the peer's
  LAN address would hand the moved port on; a packet of the stale flow makes the router collect it, and
  one that dies there creates nothing), then runs an attempt without a call-me-maybe (a call would make
  the keeper probe too, and poison the quiet side's router again): its probe leaves from its natural port
  and matches the keeper's mapping; the keeper answers, ends its round and probes back at once.

A round is ended by anything that makes a fresh attempt worth it: new candidates, the relay going down,
a probe from the peer, a call-me-maybe from the peer (a peer in our round never calls: this one restarted
or missed the attempt, and the attempt both now run puts them into the same round if it fails). After
``seq_rounds`` rounds without success the usual backoff resumes.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from meshd.attempts import Attempts
from meshd.pathevents import (
    PathConfig,
    PathEvent,
    SendKeepalives,
    SendProbes,
    UseDirect,
    UseRelay,
)
from meshd.proto.endpoint import Endpoint


class PathKind(enum.StrEnum):
    """The ``path`` field of ``meshd status`` (docs/design.md §3.3)."""

    DIRECT = "direct"
    RELAY = "relay"
    NONE = "none"


class CandidateKind(enum.IntEnum):
    """Where a candidate address came from; lower is preferred."""

    LAN = 0  #: an address of the peer's own interfaces
    PUBLIC = 1  #: STUN-reflexive or port-mapped
    PEER_REFLEXIVE = 2  #: learned from where an answer or probe came from (RFC 8445 §7.2.5.3.1)


@dataclass(frozen=True, slots=True)
class Candidate:
    """An address the peer may be reachable at."""

    addr: Endpoint
    kind: CandidateKind


@dataclass(frozen=True, slots=True)
class PathStatus:
    """What ``meshd status`` shows for the peer's path."""

    path: PathKind
    endpoint: Endpoint | None
    rtt: float | None


@dataclass(frozen=True, slots=True)
class _Answer:
    at: float
    rtt: float


class PeerPath:
    """Path state for one peer. See the module docstring for the rules."""

    def __init__(
        self,
        peer: str,
        now: float,
        *,
        relay_up: bool,
        config: PathConfig | None = None,
        leads: bool = False,
    ) -> None:
        """``relay_up``: whether the relay really is up now (no default: assuming it made a new peer
        report ``relay`` with every relay link down). ``leads``: we keep first in sequenced rounds (the
        two sides must disagree; the caller compares node keys)."""
        self.peer = peer
        self.leads = leads
        self.config = config or PathConfig()
        self._relay_up = relay_up
        self._candidates: dict[Endpoint, CandidateKind] = {}
        self._answers: dict[Endpoint, _Answer] = {}
        self._avoid: dict[Endpoint, float] = {}  # address -> avoided until
        self._direct: Endpoint | None = None
        self._direct_since = 0.0
        self._handshake_known = False
        self._last_handshake: float | None = None
        self._next_heartbeat: float | None = None
        self._next_discovery: float | None = None
        self._events: deque[PathEvent] = deque()
        self._attempts = Attempts(
            peer,
            self.config,
            leads=leads,
            targets=self._probe_targets,
            public=self._public_targets,
            events=self._events,
        )
        self._events.append(UseRelay(peer, "start"))

    # --- inputs ----------------------------------------------------------------------------------------

    def set_candidates(self, candidates: Iterable[Candidate], now: float) -> None:
        """The peer's candidate addresses changed: try them at once, forgetting earlier failures."""
        self._candidates = {c.addr: c.kind for c in candidates}
        if self._direct is not None and self._direct not in self._candidates:
            self._candidates[self._direct] = CandidateKind.PEER_REFLEXIVE
        self._avoid.clear()
        self._attempts.fresh()
        self._attempts.end_rounds()
        if self._direct is None:
            self._attempts.start(now)
        else:
            self._discover(now)

    def probe_answered(self, sent_to: Endpoint, answered_from: Endpoint, rtt: float, now: float) -> None:
        """A probe sent to ``sent_to`` was answered from ``answered_from`` after ``rtt`` seconds."""
        if rtt > self.config.late_after or rtt < 0:
            return
        if answered_from != sent_to:
            self._learn(answered_from, now)
            return
        if sent_to not in self._candidates:
            return  # an answer to a probe for a candidate since withdrawn
        self._answers[sent_to] = _Answer(now, rtt)
        self._reselect(now)

    def probe_received(self, src: Endpoint, now: float) -> None:
        """The peer's probe arrived from ``src``: its NAT is open to us, so without a direct path probe
        back at once (ending a sequenced round); a new ``src`` becomes a candidate (peer-reflexive)."""
        known = src in self._candidates
        self._learn(src, now)
        if self._direct is None and not self._attempts.running:
            self._attempts.end_rounds()
            self._attempts.fresh()
            self._attempts.start(now, immediate=True)
        elif self._direct is None and known and src not in self._attempts.echoed:
            # an attempt runs, but our probe to src may have hit the peer's NAT before the peer's own
            # probe opened it (the two cannot cross on fast links): answer it now, not at the next tick
            # (up to probe_interval later; issue 15). Once per address per attempt: no probe ping-pong.
            self._attempts.echoed.add(src)
            self._send_probes((src,), immediate=True)

    def handshake(self, last_handshake: float | None, now: float) -> None:
        """WireGuard's last handshake with this peer, converted by the caller to the clock of ``now``.

        Call it regularly (every second or so); the stall rule is active only once it has been called.
        """
        advanced = last_handshake is not None and (
            self._last_handshake is None or last_handshake > self._last_handshake
        )
        self._handshake_known = True
        self._last_handshake = last_handshake
        if advanced and self._direct is not None and (last_handshake or 0.0) >= self._direct_since:
            self._attempts.fresh()  # the direct path proved itself
        self._check_stall(now)

    def peer_asked(self, now: float, at: float | None = None) -> None:
        """The peer asked us to probe now ("call me maybe"): both sides probing together opens the NATs.

        Without a direct path an attempt starts at once (backoff reset) unless one is running already.
        It ends a sequenced round: a peer in our round never calls (its probes at the end of its wait go
        out without a call), so this one is not in it (it restarted, or missed the attempt before); an
        attempt both sides ran puts them into the same round when it fails.
        """
        if self._attempts.in_round:
            self._attempts.end_rounds()
        if self._direct is None and not self._attempts.running:
            self._attempts.fresh()
            self._attempts.start(now)
        elif self._direct is None:
            # an attempt runs already: probe at the agreed moment (the punch holds these until then),
            # not at its next tick, up to ``probe_interval`` later (issue 15)
            self._send_probes(self._probe_targets())
        self._attempts.synchronise(now if at is None else at)

    def calling(self, now: float, at: float) -> None:
        """Our call-me-maybe went out, proposing to probe at ``at``: the peer probes in this attempt too."""
        self._attempts.synchronise(at)

    def retry_now(self, now: float) -> None:
        """Our own addresses changed: start an attempt at once (as :meth:`peer_asked`, which the peer
        did not), unless one or a sequenced round runs."""
        if self._direct is None and not self._attempts.running and not self._attempts.in_round:
            self._attempts.fresh()
            self._attempts.start(now)

    def relay_up(self, now: float) -> None:
        """The relay connection is up."""
        self._relay_up = True

    def relay_down(self, now: float) -> None:
        """The relay connection is down: without a direct path the peer is unreachable, so try at once."""
        self._relay_up = False
        if self._direct is None:
            self._attempts.fresh()
            self._attempts.end_rounds()
            self._attempts.start(now)

    # --- timers ----------------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        times = [
            t
            for t in (
                *self._attempts.timers(),
                self._next_heartbeat,
                self._next_discovery,
                self._dead_at(),
                self._stall_at(),
            )
            if t is not None
        ]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Do whatever is due at ``now``."""
        cfg = self.config
        self._avoid = {a: t for a, t in self._avoid.items() if t > now}
        self._check_stall(now)
        self._reselect(now)
        if self._direct is None:
            self._attempts.handle_timer(now)
        else:
            if self._next_heartbeat is not None and now >= self._next_heartbeat:
                quiet = now - self._answers[self._direct].at > 1.5 * cfg.heartbeat_interval
                # a missed heartbeat: probe everything, so a rebound or other address is fresh when needed
                self._send_probes(self._probe_targets() if quiet else (self._direct,))
                self._next_heartbeat = now + cfg.heartbeat_interval
            if self._next_discovery is not None and now >= self._next_discovery:
                self._discover(now)

    # --- outputs ---------------------------------------------------------------------------------------

    def next_event(self) -> PathEvent | None:
        """The next decision to carry out, or None."""
        return self._events.popleft() if self._events else None

    @property
    def seq_round(self) -> tuple[int, bool] | None:
        """The sequenced round running (its number, whether we keep), None outside rounds (for the log)."""
        a = self._attempts
        return (a.round, a.keep) if a.in_round else None

    @property
    def status(self) -> PathStatus:
        if self._direct is not None:
            return PathStatus(PathKind.DIRECT, self._direct, self._answers[self._direct].rtt)
        return PathStatus(PathKind.RELAY if self._relay_up else PathKind.NONE, None, None)

    # --- internals -------------------------------------------------------------------------------------

    def _learn(self, addr: Endpoint, now: float) -> None:
        if addr in self._candidates or addr in self._avoid:
            return
        self._candidates[addr] = CandidateKind.PEER_REFLEXIVE
        self._send_probes((addr,), immediate=True)

    def _probe_targets(self) -> tuple[Endpoint, ...]:
        """Global addresses first: they matter most, and a new flow on a Linux NAT takes the port of the
        newest flow of its source (sequenced rounds), so the flow to the global address is made first."""
        return tuple(sorted((a for a in self._candidates if a not in self._avoid), key=global_first))

    def _send_probes(
        self, targets: tuple[Endpoint, ...], *, immediate: bool = False, first: bool = False
    ) -> None:
        if targets:
            self._events.append(SendProbes(self.peer, targets, immediate, first))

    def _public_targets(self) -> tuple[Endpoint, ...]:
        return tuple(a for a in self._probe_targets() if self._candidates[a] is not CandidateKind.LAN)

    def _discover(self, now: float) -> None:
        self._send_probes(self._probe_targets())
        self._next_discovery = now + self.config.discovery_interval

    def _alive(self, now: float) -> dict[Endpoint, _Answer]:
        return {
            a: ans
            for a, ans in self._answers.items()
            if ans.at + self.config.dead_after > now and a not in self._avoid and a in self._candidates
        }

    def _rank(self, addr: Endpoint, ans: _Answer) -> tuple[int, float]:
        # IPv4 before IPv6 when both answer (issue 15): IPv6 is for peers IPv4 would leave on the relay
        family = len(CandidateKind) if ":" in addr[0] else 0
        return (family + int(self._candidates[addr]), ans.rtt)

    def _reselect(self, now: float) -> None:
        alive = self._alive(now)
        best = min(alive, key=lambda a: self._rank(a, alive[a])) if alive else None
        current = self._direct
        if current is None:
            if best is not None:
                self._go_direct(best, alive[best], now, "probe answered")
        elif current not in alive:
            if best is not None:
                self._go_direct(best, alive[best], now, f"{_fmt(current)} stopped answering")
            else:
                self._go_relay(now, f"heartbeat lost from {_fmt(current)}")
        elif best is not None and best != current:
            b, c = self._rank(best, alive[best]), self._rank(current, alive[current])
            if b[0] < c[0] or (b[0] == c[0] and b[1] < c[1] * self.config.switch_ratio):
                self._go_direct(best, alive[best], now, "better path")

    def _go_direct(self, addr: Endpoint, ans: _Answer, now: float, reason: str) -> None:
        if self._direct is None:
            self._direct_since = now
            self._next_discovery = now + self.config.discovery_interval
        self._attempts.stop()
        self._direct = addr
        self._next_heartbeat = now + self.config.heartbeat_interval
        self._events.append(UseDirect(self.peer, addr, ans.rtt, reason))

    def _go_relay(self, now: float, reason: str) -> None:
        self._direct = None
        self._next_heartbeat = self._next_discovery = None
        self._events.append(UseRelay(self.peer, reason))
        self._attempts.retry_later(now)

    def _dead_at(self) -> float | None:
        if self._direct is None:
            return None
        return self._answers[self._direct].at + self.config.dead_after

    def _stall_at(self) -> float | None:
        if self._direct is None or not self._handshake_known:
            return None
        since = self._direct_since
        if self._last_handshake is not None:
            since = max(since, self._last_handshake)
        return since + self.config.handshake_stall

    def _check_stall(self, now: float) -> None:
        stall_at = self._stall_at()
        if self._direct is None or stall_at is None or now < stall_at:
            return
        bad = self._direct
        self._avoid[bad] = now + self.config.stall_penalty
        self._answers.pop(bad, None)
        alive = self._alive(now)
        if alive:
            best = min(alive, key=lambda a: self._rank(a, alive[a]))
            self._direct = None  # a fresh direct period for the stall rule
            self._go_direct(best, alive[best], now, f"WireGuard handshake stalled on {_fmt(bad)}")
        else:
            self._go_relay(now, f"WireGuard handshake stalled on {_fmt(bad)}")


def global_first(addr: Endpoint) -> tuple[bool, str, int]:
    """Sort key: global addresses before private ones (see ``PeerPath._probe_targets``)."""
    try:
        private = ipaddress.ip_address(addr[0]).is_private
    except ValueError:
        private = True
    return (private, addr[0], addr[1])


def _fmt(addr: Endpoint) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = [
    "Candidate",
    "CandidateKind",
    "Endpoint",
    "PathConfig",
    "PathEvent",
    "PathKind",
    "PathStatus",
    "PeerPath",
    "SendKeepalives",
    "SendProbes",
    "UseDirect",
    "UseRelay",
    "global_first",
]
