"""Upgrade attempts for one peer without a direct path (sans-IO): bursts of probes, the backoff between
them, and the sequenced rounds that follow a synchronised attempt that got no answer.

The rules are in the :mod:`meshd.paths` docstring ("Whenever the peer is not on a direct path..." and
"Sequenced rounds"). :class:`meshd.paths.PeerPath` owns one :class:`Attempts`, tells it what happened
(with ``now``) and calls :meth:`Attempts.handle_timer` while the peer is not direct; the decisions
(:class:`~meshd.pathevents.SendProbes`, :class:`~meshd.pathevents.SendKeepalives`) go to the path's
event queue. Where to probe is the path's business: it passes ``targets`` (every candidate worth a probe,
global addresses first) and ``public`` (those that are not the peer's LAN addresses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from meshd.pathevents import PathConfig, PathEvent, SendKeepalives, SendProbes
from meshd.proto.endpoint import Endpoint

Targets = Callable[[], tuple[Endpoint, ...]]


class EventSink(Protocol):
    def append(self, event: PathEvent, /) -> None: ...


class Attempts:
    """Attempt and sequenced-round state for one peer (module docstring)."""

    def __init__(
        self,
        peer: str,
        config: PathConfig,
        *,
        leads: bool,
        targets: Targets,
        public: Targets,
        events: EventSink,
    ) -> None:
        self.peer = peer
        self.config = config
        self.leads = leads  #: we keep first in sequenced rounds (the two sides disagree)
        self._targets = targets
        self._public = public
        self._events = events
        self.backoff = config.backoff_initial
        self.until: float | None = None  #: the running attempt ends
        self.next_probe: float | None = None
        self.next_attempt: float | None = None
        self.synced = False  #: a call-me-maybe went either way during this attempt: both probed
        self.immediate = False  #: this attempt's probes need no call-me-maybe
        self.anchor: float | None = None  #: the moment agreed with the peer for this attempt
        self.echoed: set[Endpoint] = set()  #: probed at once this attempt because the peer's probe came
        self.round = 0  #: sequenced rounds run since the last fresh start
        self.keep = False  #: we keep (rather than wait quietly) in the current round
        self.round_until: float | None = None  #: the current round ends (keeper) or probes (quiet side)
        self.next_keepalive: float | None = None

    @property
    def running(self) -> bool:
        """An attempt is running."""
        return self.until is not None

    @property
    def in_round(self) -> bool:
        """A sequenced round is running."""
        return self.round_until is not None

    def timers(self) -> tuple[float | None, ...]:
        return (self.next_probe, self.until, self.next_attempt, self.round_until, self.next_keepalive)

    def fresh(self) -> None:
        """Something worth trying at once happened: the backoff starts over."""
        self.backoff = self.config.backoff_initial

    def start(self, now: float, *, immediate: bool = False) -> None:
        """Start an attempt: its first probes now (``immediate``: without a call-me-maybe)."""
        self.next_attempt = None
        self.echoed.clear()
        self.synced = False
        self.immediate = immediate
        self.anchor = None
        self.round_until = self.next_keepalive = None
        targets = self._targets()
        if not targets:
            self.until = self.next_probe = None
            return  # nothing to try until candidates arrive
        self._events.append(SendProbes(self.peer, targets, immediate, not immediate))
        self.until = now + self.config.attempt_duration
        self.next_probe = now + self.config.probe_interval

    def synchronise(self, at: float) -> None:
        """A call-me-maybe went either way for the running attempt: both sides probe from ``at`` on, and
        both end the attempt ``attempt_duration`` after the latest such moment, so that when it fails they
        start the same sequenced round at the same moment."""
        if self.until is None:
            return
        self.anchor = at if self.anchor is None else max(self.anchor, at)
        self.until = self.anchor + self.config.attempt_duration
        self.synced = True

    def stop(self) -> None:
        """The peer went direct: no attempt, no round, nothing scheduled (the backoff is kept)."""
        self.end_rounds()
        self.until = self.next_probe = self.next_attempt = None

    def retry_later(self, now: float) -> None:
        """No attempt now: the next one after the backoff, which doubles (up to ``backoff_max``)."""
        self.until = self.next_probe = None
        self.next_attempt = now + self.backoff
        self.backoff = min(self.backoff * 2, self.config.backoff_max)

    def end_rounds(self) -> None:
        self.round = 0
        self.round_until = self.next_keepalive = None

    def handle_timer(self, now: float) -> None:
        """Whatever is due at ``now`` while the peer has no direct path."""
        if self.until is not None and now >= self.until:
            self.until = self.next_probe = None
            if not self._start_round(now):
                self.retry_later(now)
        elif self.next_probe is not None and now >= self.next_probe:
            if targets := self._targets():
                self._events.append(SendProbes(self.peer, targets, self.immediate))
            self.next_probe = now + self.config.probe_interval
        if self.next_attempt is not None and now >= self.next_attempt:
            self.start(now)
        self._round_timers(now)

    def _start_round(self, now: float) -> bool:
        """An attempt got no answer: start the next sequenced round, if any is left."""
        cfg = self.config
        if not self.synced and self.round == 0:
            return False  # no call-me-maybe either way: the peer may not know us yet, a plain retry
        if self.round >= cfg.seq_rounds or not self._public():
            return False
        self.round += 1
        self.keep = self.leads == (self.round % 2 == 1)
        if self.keep:
            self.round_until = now + cfg.seq_wait + cfg.attempt_duration + cfg.seq_grace
            self._keepalive(now)
        else:
            self.round_until = now + cfg.seq_wait
        return True

    def _keepalive(self, now: float) -> None:
        if targets := self._public():
            self._events.append(SendKeepalives(self.peer, targets))
        self.next_keepalive = now + self.config.seq_keepalive

    def _round_timers(self, now: float) -> None:
        if self.round_until is None:
            return
        if self.next_keepalive is not None and now >= self.next_keepalive:
            self._keepalive(now)
        if now >= self.round_until:
            keeper = self.keep
            self.round_until = self.next_keepalive = None
            if not keeper:
                # our old flows expired, the peer kept its mapping: make our router forget the stale flows
                # (TTL-1), then probe it without a call-me-maybe (meshd.paths docstring)
                if targets := self._targets():
                    self._events.append(SendKeepalives(self.peer, targets))
                self.start(now, immediate=True)
            elif not self._start_round(now):
                self.retry_later(now)
