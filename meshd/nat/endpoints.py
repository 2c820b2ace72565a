"""Carry path decisions out on WireGuard: each peer's endpoint and its persistent keepalive.

The path machines decide (:class:`meshd.paths.UseDirect`, :class:`meshd.paths.UseRelay`); this shell
points WireGuard there with ``set_endpoint``. Only the latest undone decision per peer is kept: a
decision overtaken before WireGuard was told is worthless, and the backlog stays bounded by the number
of peers however fast paths flap.

Turning keepalive on makes WireGuard start a handshake at once. If both sides did that at the same
moment the two initiations would cross, both would end as responders (which may not send data first)
and WireGuard would only retry after REKEY_TIMEOUT (5 s). So only the side with the lower WireGuard key
starts; the other turns keepalive on once a handshake happened (or after ``KEEPALIVE_FALLBACK``
seconds without one and nothing received from the peer).

Keepalive is not the only trigger: any packet to the peer (the user's first ping) makes WireGuard send an
initiation too, and wireguard-go keeps only the last handshake state, so an initiation of the higher key
that crosses the lower key's one still leaves both as responders (issue 15: 1 run in 2 lost 2-5 s). So
the higher key's WireGuard gets *no endpoint at all* until the first handshake (or the fallback): an
initiation it makes then cannot leave, the lower key's initiation arrives, WireGuard answers it at the
address it came from (it roams there), and the packets that triggered its own attempt go out once the
lower key confirms the session. Only then does it get the endpoint decided meanwhile (``held``).

The lower key's WireGuard gets its endpoint in the very operation that adds the peer (``first_endpoint``,
through the map's reconcile), not a moment later when the relay decision is carried out. wireguard-go
stamps a handshake attempt *before* sending it and makes at most one per REKEY_TIMEOUT (5 s): a packet to
the peer in between (the user's first ping, as soon as the hosts file names it) made an attempt that
failed ("no known endpoint for peer") and silenced the peer, so turning keepalive on a few milliseconds
later sent nothing, and the first handshake waited for the restart below, about 2 s (issue 15: every
slow first ping of the time_to_direct runs). The same stamp is why the higher key's fallback restarts the
handshake rather than only turning keepalive on: its own packets burned attempts while it had no endpoint.

An initiation that reaches the peer through the relay before the peer's WireGuard has us is not lost:
the peer's relay client holds it until its map's reconcile added us (meshd.relay.waiting).

Should a first handshake still cross (the higher key's fallback meeting a late initiation of the lower
key) or the lower key's first initiation be lost (e.g. on a direct path), the lower key does not
wait for WireGuard's 5 s retry: with no handshake ``RESTART_AFTER`` seconds after its keepalive went on,
it removes the peer and adds it back (``restart_handshake``), which initiates again at once (at most
``MAX_RESTARTS`` times). The higher key falls back only while nothing at all came from the peer (a
received initiation means the lower key is at work: initiating now would be the crossing).

A rotation of our own WireGuard key (``meshd rotate-keys``) starts every session over, and a peer learns
the new key only from its next map, some 100-200 ms later. Our first initiation with the new key (the
next ping makes one at once) reaches a peer that drops it, and wireguard-go tries again only after 5 s:
beta->alpha lost 3.2-3.6 s of pings in ``tests/netns/test_rotation.py`` (a flaky failure of the suite).
So after :meth:`WgEndpoints.rekeyed` a handshake from before the rotation counts as none: the lower key
initiates afresh ``RESTART_AFTER`` seconds later (the higher key's peer, new to it, initiates itself).

WireGuard roams: any authenticated packet from a new address becomes the peer's endpoint. While the two
sides switch to a direct path one after the other, a packet the peer still sent through the relay
arrives from our local relay proxy and points WireGuard back at it; if the peer did the same with ours,
both stay on the relay for good, and lose each other when it goes down, while their path machines
say "direct". So the handshake poll puts WireGuard back on the direct endpoint whenever it finds it
roamed onto the relay against the decision. (Roaming to any other address is left alone: that is the
peer's NAT rebinding, which the probes pick up.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from meshd.paths import UseDirect, UseRelay
from meshd.peerset import KEEPALIVE_SECONDS
from meshd.proto.endpoint import Endpoint, format_endpoint
from meshd.wg.base import WireGuardBackend
from meshd.wg.errors import WgError

log = logging.getLogger("meshd.nat")

#: the higher-key side turns keepalive on after this long without a handshake (not sooner: on a busy
#: machine the lower key's first initiation may take over a second, and meeting it would be the crossing;
#: a lost one the lower key sends again after RESTART_AFTER)
KEEPALIVE_FALLBACK = 3.0
RESTART_AFTER = 1.0  #: the lower key initiates afresh after this long without a first handshake
MAX_RESTARTS = 2  #: ... at most this often per peer (then WireGuard's own retries carry on)


@dataclass
class _Applied:
    endpoint: Endpoint | None = None  #: what WireGuard was last pointed at (direct or relay proxy)
    endpoint_at: float | None = None  #: when the peer first got an endpoint
    direct: bool = False  #: ``endpoint`` is a direct path (not the relay proxy)
    name: str = ""  #: the peer's name, for the log
    keepalive_on: bool = False  #: persistent keepalive enabled on this peer
    held: bool = False  #: ``endpoint`` is decided but not given to WireGuard yet (higher key, no handshake)
    kept_at: float | None = None  #: when keepalive went on (or the handshake was last restarted)
    restarts: int = 0  #: first handshakes restarted (lower key, module docstring)
    rekeyed_at: float | None = None  #: our key rotated then: an older handshake counts as none


class WgEndpoints:
    """Endpoints and keepalive of every peer, as last set on WireGuard."""

    def __init__(
        self,
        backend: WireGuardBackend,
        *,
        relay_endpoint: Callable[[str], Endpoint | None],
        own_key: Callable[[], str],
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self.backend = backend
        self.relay_endpoint = relay_endpoint
        self.own_key = own_key
        self.clock, self.wall = clock, wall
        self._applied: dict[str, _Applied] = {}
        self._decided: dict[str, tuple[str, UseDirect | UseRelay]] = {}  # latest (name, decision) not done
        self._ready = asyncio.Event()
        #: UDP relay ports (issue 14, meshd/relay/udpports.py): told which peers are relayed; which
        #: addresses are a peer's relay (its TCP relay proxy or its UDP relay port); relayed peers whose
        #: relay endpoint changed, to be pointed at it again
        self.relay_use: Callable[[str, bool], None] = lambda peer, relayed: None
        self.is_relay: Callable[[str, Endpoint | None], bool] = lambda peer, ep: (
            ep == self.relay_endpoint(peer)
        )
        self._moved: set[str] = set()

    def relay_moved(self, peer: str) -> None:
        """The peer's relay endpoint changed (UDP relay port ready, or gone): re-point it if relayed."""
        self._moved.add(peer)
        self._ready.set()

    def decide(self, peer: str, name: str, ev: UseDirect | UseRelay) -> None:
        """Point ``peer`` (WireGuard key) where ``ev`` says, soon; ``name`` is for the log."""
        self._decided[peer] = (name, ev)
        self._ready.set()

    def retain(self, peers: set[str]) -> None:
        """Only these peers remain: forget the others' state."""
        self._decided = {k: v for k, v in self._decided.items() if k in peers}
        self._applied = {k: v for k, v in self._applied.items() if k in peers}

    def rekeyed(self) -> None:
        """Our WireGuard key was rotated (module docstring): every peer needs a handshake with it."""
        now = self.clock()
        for a in self._applied.values():
            a.rekeyed_at, a.kept_at, a.restarts = now, now, 0

    def keepalive_on(self, peer: str) -> bool:
        a = self._applied.get(peer)
        return bool(a and a.keepalive_on)

    def first_endpoint(self, peer: str) -> Endpoint | None:
        """The endpoint WireGuard adds ``peer`` with: the relay proxy if we have the lower key and no
        endpoint was set yet (so keepalive is on from the start, ``peerset.wg_peers``), else None (keep
        what WireGuard has). See the module docstring: a peer without an endpoint loses its first
        handshake to the first packet sent to it."""
        a = self._applied.get(peer)
        if (a is not None and a.endpoint is not None) or not self.own_key() < peer:
            return None
        return self.relay_endpoint(peer)

    async def apply_loop(self) -> None:
        """Carry out decisions as they come (run it as a supervised task)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._decided:
                peer = next(iter(self._decided))
                await self._apply(peer, *self._decided.pop(peer))
            moved, self._moved = self._moved, set()
            for peer in moved:
                await self._relay_moved(peer)

    async def _relay_moved(self, peer: str) -> None:
        a = self._applied.get(peer)
        if a is None or a.direct or a.endpoint is None:
            return
        target = self.relay_endpoint(peer)
        if target is None or target == a.endpoint:
            return
        if a.held:  # WireGuard gets it with the first handshake
            a.endpoint = target
            return
        try:
            await self.backend.set_endpoint(peer, target, KEEPALIVE_SECONDS if a.keepalive_on else None)
        except WgError as e:
            log.warning("%s: setting relay endpoint %s: %s", a.name, format_endpoint(target), e)
            return
        log.info("%s: relay endpoint %s", a.name, format_endpoint(target))
        a.endpoint = target

    async def handshakes(self) -> list[tuple[str, float | None]]:
        """Every peer's last handshake on the ``clock`` timeline; turns keepalive on where it is due."""
        try:
            state = await self.backend.state()
        except WgError as e:
            log.debug("reading handshakes: %s", e)
            return []
        wall, mono = self.wall(), self.clock()
        out = []
        for ps in state.peers:
            lh = None if ps.last_handshake is None else ps.last_handshake - wall + mono
            out.append((ps.public_key, lh))
            a = self._applied.get(ps.public_key)
            if a is None or a.endpoint is None:
                continue
            if a.held:
                late = a.endpoint_at is not None and mono - a.endpoint_at >= KEEPALIVE_FALLBACK
                if lh is not None or (late and ps.rx_bytes == 0):
                    if lh is None:
                        log.info("%s: no WireGuard handshake from the peer yet: starting one", a.name)
                    await self._release(ps.public_key, a, mono, handshake=lh is not None)
                continue
            if (
                ps.endpoint != a.endpoint
                and self.is_relay(ps.public_key, ps.endpoint)
                and (a.direct or a.endpoint == self.relay_endpoint(ps.public_key))
            ):
                log.info(
                    "%s: WireGuard roamed back to the relay; pointing it at %s again",
                    a.name,
                    format_endpoint(a.endpoint),
                )
                with contextlib.suppress(WgError):
                    await self.backend.set_endpoint(ps.public_key, a.endpoint)
            if a.keepalive_on:
                if a.rekeyed_at is not None and lh is not None and lh < a.rekeyed_at:
                    lh = None  # a session of the old key (module docstring)
                if lh is None and self._restart_due(ps.public_key, a, mono):
                    await self._restart(ps.public_key, a, mono)
                continue
            late = a.endpoint_at is not None and mono - a.endpoint_at >= KEEPALIVE_FALLBACK
            if lh is not None or late:
                with contextlib.suppress(WgError):
                    await self.backend.set_endpoint(ps.public_key, a.endpoint, KEEPALIVE_SECONDS)
                    a.keepalive_on, a.kept_at = True, mono
        return out

    async def _apply(self, peer: str, name: str, ev: UseDirect | UseRelay) -> None:
        self.relay_use(peer, isinstance(ev, UseRelay))
        target = ev.endpoint if isinstance(ev, UseDirect) else self.relay_endpoint(peer)
        if target is None:
            return
        a = self._applied.setdefault(peer, _Applied())
        initiate = a.keepalive_on or self.own_key() < peer
        if not initiate and (a.held or a.endpoint is None):
            # higher key, no handshake yet: no endpoint for WireGuard (module docstring)
            if a.endpoint is None:
                a.endpoint_at = self.clock()
            a.endpoint, a.direct, a.name, a.held = target, isinstance(ev, UseDirect), name, True
            return
        try:
            await self.backend.set_endpoint(peer, target, KEEPALIVE_SECONDS if initiate else None)
        except WgError as e:
            log.warning("%s: setting endpoint %s: %s", name, format_endpoint(target), e)
            return
        if a.endpoint is None:
            a.endpoint_at = self.clock()
        a.endpoint = target
        a.direct = isinstance(ev, UseDirect)
        a.name = name
        if initiate and not a.keepalive_on:
            a.kept_at = self.clock()
        a.keepalive_on = a.keepalive_on or initiate

    def _restart_due(self, peer: str, a: _Applied, now: float) -> bool:
        return (
            self.own_key() < peer
            and a.kept_at is not None
            and a.restarts < MAX_RESTARTS
            and now - a.kept_at >= RESTART_AFTER
        )

    async def _restart(self, peer: str, a: _Applied, now: float) -> None:
        """No first handshake yet (crossed, or our initiation was lost): initiate afresh, now."""
        a.restarts += 1
        a.kept_at = now
        try:
            await self.backend.restart_handshake(peer)
        except WgError as e:
            log.debug("%s: restarting the handshake: %s", a.name, e)
            return
        log.info(
            "%s: no WireGuard handshake %.1f s after starting one: initiating again", a.name, RESTART_AFTER
        )

    async def _release(self, peer: str, a: _Applied, now: float, handshake: bool) -> None:
        """The first handshake happened (or the lower key is late: ``handshake`` False): give WireGuard
        the endpoint decided meanwhile, with keepalive (and a fresh handshake when there was none)."""
        assert a.endpoint is not None
        try:
            await self.backend.set_endpoint(peer, a.endpoint, KEEPALIVE_SECONDS)
            if not handshake:  # our own packets may have burned the attempt keepalive would make
                await self.backend.restart_handshake(peer)
        except WgError as e:
            log.debug("%s: setting endpoint %s: %s", a.name, format_endpoint(a.endpoint), e)
            return
        a.held, a.keepalive_on, a.kept_at = False, True, now
