"""When probes leave: call-me-maybe timing for every peer (sans-IO).

Two NATs open for each other only when both sides probe at about the same moment: a probe that
reaches a NAT before our own probe has left through it is dropped, and some routers (Linux without an
input firewall) even create a conntrack entry for themselves on the way, so that the peer's flow is
remapped to a random port and the punch fails for good. So a new attempt does not probe at once:

* it sends the peer a call-me-maybe (through the coordinator) proposing a wall-clock moment
  ``PUNCH_DELAY`` ahead, and holds its probes until then;
* a peer that receives a call-me-maybe probes at the moment proposed; when both asked at once (the
  messages crossed) both use the later of the two moments, so they still probe together;
* the wait is never negative (a moment in the past means now) nor longer than ``MAX_PUNCH_WAIT`` (a
  skewed or hostile clock cannot stall probes);
* a peer's call-me-maybe counts as ours: we do not answer it with one of our own, and we send at most
  one every ``CMM_MIN_INTERVAL`` seconds per peer, and one per attempt (its first probes, or the first
  ones after a change of addresses): both sides end the attempt a fixed time after the moment agreed,
  so a second call in the same attempt would stretch it (``PeerPath.calling``);
* the side with the higher node key (``lead=False``) probes ``FOLLOW_LAG`` after the agreed moment: where
  the first probes cannot cross (a router without an input firewall, links too fast for two processes
  to send within the same tens of microseconds) the leader's mapping is the one left intact, which is
  what the sequenced rounds of :mod:`meshd.paths` build on; on real links the lag is within the jitter;
* until our own public addresses are known (every STUN server answered or gave up, or
  ``GATHER_TIMEOUT`` after start) probes are held: a punch now would reach the peer's NAT before we can
  tell the peer where to answer. Once gathered, every peer without a direct path starts a fresh,
  synchronised attempt.

:class:`Punch` owns no socket, clock or task. It is fed the path machines' probe decisions with
``now`` (any monotonic clock) and hands out what to do with :meth:`Punch.next_event`: :class:`Probe`
(send now), :class:`Call` (send a call-me-maybe) and :class:`Restart` (start an attempt now:
``PeerPath.peer_asked``). Moments are kept on the ``now`` timeline; the wall clock enters only where a
moment crosses the wire: :meth:`Punch.called` takes ``wall`` with the peer's proposal, and whoever
sends a :class:`Call` converts its ``at`` (``wall + at - now``). It asks ``is_direct(peer)`` (the path
machine's current status) where the rules depend on it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from meshd.paths import global_first
from meshd.proto.endpoint import Endpoint

PUNCH_DELAY = 0.25  #: a new attempt's first probes go out this long after the call-me-maybe is sent
MAX_PUNCH_WAIT = 1.0  #: the longest we hold probes for a moment the peer proposed
CMM_MIN_INTERVAL = 2.0  #: at most one call-me-maybe per peer this often
GATHER_TIMEOUT = 2.0  #: probes wait at most this long after start for our STUN answers
FOLLOW_LAG = 0.01  #: the follower's probes leave this long after the agreed moment
NEVER = float("-inf")


@dataclass(frozen=True, slots=True)
class Probe:
    """Send one probe to each of ``endpoints`` now."""

    peer: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Call:
    """Send the peer a call-me-maybe with our current candidates, proposing the moment ``at``.

    ``at`` is on the ``now`` timeline: the message carries it as Unix time, ``wall + at - now``.
    """

    peer: str
    at: float


@dataclass(frozen=True, slots=True)
class Restart:
    """Start an upgrade attempt for the peer now, unless one runs (``PeerPath.peer_asked``)."""

    peer: str
    by_peer: bool = False  #: the peer's call-me-maybe (it probes too), not our own addresses changing
    at: float | None = None  #: the moment agreed with the peer (``now`` timeline), for ``by_peer``


PunchEvent = Probe | Call | Restart


@dataclass
class _State:
    last_cmm: float = NEVER  #: when a call-me-maybe last went either way
    hold_until: float | None = None  #: probes wait until this moment (agreed with the peer)
    my_at: float | None = None  #: the moment our last call-me-maybe proposed
    held: set[Endpoint] = field(default_factory=set)
    lag: float = 0.0  #: FOLLOW_LAG for the follower, 0 for the leader
    need_call: bool = True  #: no call-me-maybe went either way for the current attempt yet
    told: bool = False  #: we sent the peer a call-me-maybe (our candidates) since our STUN answers came


class Punch:
    """Call-me-maybe timing for every peer; see the module docstring for the rules."""

    def __init__(self, is_direct: Callable[[str], bool]) -> None:
        self._is_direct = is_direct
        self._peers: dict[str, _State] = {}
        self._gathered = False
        self._gather_deadline: float | None = None
        self._events: deque[PunchEvent] = deque()

    # --- inputs ----------------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Probing begins: wait for our STUN answers at most ``GATHER_TIMEOUT`` from now."""
        if not self._gathered:
            self._gather_deadline = now + GATHER_TIMEOUT

    def add(self, peer: str, *, lead: bool = True) -> None:
        """``lead``: we probe at the agreed moment; else ``FOLLOW_LAG`` after it (the sides must disagree)."""
        self._peers.setdefault(peer, _State(lag=0.0 if lead else FOLLOW_LAG))

    def remove(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def probe(self, peer: str, targets: Iterable[Endpoint], now: float, *, first: bool = False) -> None:
        """The path machine wants probes sent: send them, hold them, or first call the peer.

        ``first``: the first probes of a new attempt (a call-me-maybe is due)."""
        s = self._peers.get(peer)
        if s is None:
            return
        if first:
            s.need_call = True
        targets = tuple(targets)
        if not self._gathered:
            s.held.update(targets)
            s.last_cmm = NEVER  # once gathered, agree on a moment with the peer first
            return
        if s.hold_until is not None and now < s.hold_until:
            s.held.update(targets)
            return
        if not self._is_direct(peer) and s.need_call and now - s.last_cmm >= CMM_MIN_INTERVAL:
            s.held.update(targets)
            self._call(peer, s, now)
            return
        self._events.append(Probe(peer, targets))

    def called(self, peer: str, at: float, now: float, wall: float) -> None:
        """The peer sent a call-me-maybe proposing the Unix time ``at`` (``wall`` is ours): probe it then."""
        s = self._peers.get(peer)
        if s is None:
            return
        moment = at - wall + now  # onto our timeline
        # both sides may have asked at once (crossing messages): both then use the later moment
        if s.my_at is not None and s.my_at >= now:
            moment = max(moment, s.my_at)
        agreed = now + min(max(0.0, moment - now), MAX_PUNCH_WAIT)
        s.hold_until = agreed + s.lag
        s.last_cmm = now  # the peer is already asking: no call-me-maybe back ...
        s.need_call = False
        self._events.append(Restart(peer, by_peer=True, at=agreed))
        if self._gathered and not s.told:
            # ... except once, when the peer may not know our addresses yet (the map brings them up to
            # 0.4 s later): the agreed moment itself, which moves nothing on either side (issue 15)
            s.told = True
            self._events.append(Call(peer, agreed))

    def peer_candidates_changed(self, peer: str) -> None:
        """New addresses for the peer: agree on a new moment with it before probing them."""
        if (s := self._peers.get(peer)) is not None:
            s.last_cmm = NEVER
            s.need_call = True

    def candidates_changed(self) -> None:
        """Our own addresses changed: every peer without a direct path hears them at once, with a moment."""
        self._reask()

    def gathered(self, now: float | None = None) -> None:
        """Every STUN server answered or gave up: our candidates are as complete as they will get soon.

        With ``now``, a peer whose probes were held for this is called at once with a moment to probe,
        not at its path machine's next probe tick, up to ``probe_interval`` later (issue 15)."""
        if not self._gathered:
            self._gathered = True
            self._gather_deadline = None
            self._reask()
            if now is not None:
                for peer, s in self._peers.items():
                    if self._is_direct(peer) or s.told:
                        continue
                    if s.hold_until is None:
                        # probes held for this, or none yet: the peer hears our addresses and a moment
                        # now (it may not know our public address for another 0.4 s, issue 15)
                        self._call(peer, s, now)
                    else:  # the peer called first, before our STUN answers: tell it, same moment
                        s.told = True
                        self._events.append(Call(peer, s.hold_until - s.lag))

    @property
    def is_gathered(self) -> bool:
        return self._gathered

    # --- timers ----------------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        times = [s.hold_until for s in self._peers.values() if s.hold_until is not None]
        if self._gather_deadline is not None:
            times.append(self._gather_deadline)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self._gather_deadline is not None and now >= self._gather_deadline:
            self.gathered(now)  # STUN is slow or absent: go with what we have
        for peer, s in self._peers.items():
            if s.hold_until is not None and now >= s.hold_until:
                s.hold_until = None
                held, s.held = s.held, set()
                if held:
                    self._events.append(Probe(peer, tuple(sorted(held, key=global_first))))

    # --- outputs ---------------------------------------------------------------------------------------

    def next_event(self) -> PunchEvent | None:
        return self._events.popleft() if self._events else None

    # --- internals -------------------------------------------------------------------------------------

    def _call(self, peer: str, s: _State, now: float) -> None:
        """Hold the probes and ask the peer to probe with us ``PUNCH_DELAY`` from now."""
        s.last_cmm = now
        s.need_call = False
        s.told = True
        s.hold_until = now + PUNCH_DELAY + s.lag
        s.my_at = now + PUNCH_DELAY
        self._events.append(Call(peer, s.my_at))

    def _reask(self) -> None:
        for peer, s in self._peers.items():
            if not self._is_direct(peer):
                s.last_cmm = NEVER
                s.need_call = True
                self._events.append(Restart(peer))
