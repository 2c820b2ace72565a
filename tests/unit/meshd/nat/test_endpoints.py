"""WgEndpoints: path decisions carried out on WireGuard, and WireGuard's roaming kept in line with them."""

from __future__ import annotations

import asyncio
from typing import cast

from meshd.nat.endpoints import KEEPALIVE_FALLBACK, MAX_RESTARTS, RESTART_AFTER, WgEndpoints
from meshd.paths import UseDirect, UseRelay
from meshd.peerset import KEEPALIVE_SECONDS
from meshd.proto.endpoint import Endpoint
from meshd.wg.base import WireGuardBackend
from meshd.wg.model import InterfaceState, PeerState

PEER = "wg-b"
PROXY: Endpoint = ("127.0.0.1", 40000)  # our local relay proxy for PEER
DIRECT: Endpoint = ("7.0.0.2", 41641)
REBOUND: Endpoint = ("7.0.0.2", 50000)  # the peer's NAT gave its flow a new port


class RoamingBackend:
    """Keeps one peer's endpoint; ``roam`` is what wireguard-go does on an authenticated packet."""

    def __init__(self) -> None:
        self.endpoint: Endpoint | None = None
        self.sets: list[Endpoint] = []
        self.keepalive: int | None = None
        self.last_handshake: float | None = 1000.0
        self.rx_bytes = 0
        self.restarts = 0

    def roam(self, src: Endpoint) -> None:
        self.endpoint = src

    async def state(self) -> InterfaceState:
        peer = PeerState(PEER, self.endpoint, ("100.64.0.2/32",), self.last_handshake, self.rx_bytes, 0, 25)
        return InterfaceState("mesh0", None, 41641, 0, (peer,))

    async def set_endpoint(
        self, public_key: str, endpoint: Endpoint, persistent_keepalive: int | None = None
    ) -> None:
        assert public_key == PEER
        self.endpoint = endpoint
        self.sets.append(endpoint)
        if persistent_keepalive is not None:
            self.keepalive = persistent_keepalive

    async def restart_handshake(self, public_key: str) -> None:
        assert public_key == PEER
        self.restarts += 1


class WireGuardGo(RoamingBackend):
    """RoamingBackend that also follows wireguard-go's rule for starting a handshake (device/send.go,
    SendHandshakeInitiation): at most one attempt per REKEY_TIMEOUT, stamped *before* it is sent, so an
    attempt without an endpoint ("no known endpoint for peer") silences the peer for 5 s. A packet to
    the peer and turning keepalive on each make an attempt; removing and adding the peer forgets it."""

    REKEY_TIMEOUT = 5.0

    def __init__(self, clock: list[float], endpoint: Endpoint | None, keepalive: int) -> None:
        super().__init__()  # AddPeer(endpoint, keepalive), as the map's reconcile does
        self.clock, self.endpoint, self.keepalive = clock, endpoint, keepalive
        self.last_handshake = None
        self.attempted_at: float | None = None
        self.initiations: list[tuple[float, Endpoint]] = []  #: (when, where) initiations left
        if keepalive:
            self.attempt()

    def attempt(self) -> None:
        now = self.clock[0]
        if self.attempted_at is not None and now - self.attempted_at < self.REKEY_TIMEOUT:
            return
        self.attempted_at = now
        if self.endpoint is not None:
            self.initiations.append((now, self.endpoint))

    def packet(self) -> None:
        """The user sends the peer something (no session yet)."""
        self.attempt()

    async def set_endpoint(
        self, public_key: str, endpoint: Endpoint, persistent_keepalive: int | None = None
    ) -> None:
        was = self.keepalive
        await super().set_endpoint(public_key, endpoint, persistent_keepalive)
        if not was and self.keepalive:
            self.attempt()

    async def restart_handshake(self, public_key: str) -> None:
        await super().restart_handshake(public_key)
        self.attempted_at = None
        if self.keepalive:
            self.attempt()


async def _applied(wg: WgEndpoints) -> None:
    task = asyncio.create_task(wg.apply_loop())
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()


def _endpoints(
    backend: RoamingBackend, own_key: str = "wg-a", clock: list[float] | None = None
) -> WgEndpoints:
    now = clock or [2000.0]
    return WgEndpoints(
        cast(WireGuardBackend, backend),
        relay_endpoint=lambda key: PROXY if key == PEER else None,
        own_key=lambda: own_key,
        clock=lambda: now[0],
        wall=lambda: now[0],
    )


async def _started(own_key: str) -> tuple[RoamingBackend, list[float], WgEndpoints]:
    """A new peer put on the relay before any WireGuard handshake: the first-handshake rules apply."""
    backend = RoamingBackend()
    backend.last_handshake = None
    clock = [2000.0]
    wg = _endpoints(backend, own_key=own_key, clock=clock)
    wg.decide(PEER, "b", UseRelay(PEER, "start"))
    await _applied(wg)
    return backend, clock, wg


async def test_a_direct_peer_that_roamed_back_onto_the_relay_is_pointed_at_the_direct_path_again() -> None:
    backend = RoamingBackend()
    wg = _endpoints(backend)
    wg.decide(PEER, "b", UseRelay(PEER, "start"))
    wg.decide(PEER, "b", UseDirect(PEER, DIRECT, 0.001, "probe answered"))
    await _applied(wg)
    assert backend.endpoint == DIRECT
    # a packet the peer sent through the relay before it went direct too arrives from our proxy
    backend.roam(PROXY)
    await wg.handshakes()
    assert backend.endpoint == DIRECT, "the decision is direct: WireGuard must not stay on the relay"


async def test_roaming_to_another_address_or_while_relayed_is_left_to_wireguard() -> None:
    backend = RoamingBackend()
    wg = _endpoints(backend)
    wg.decide(PEER, "b", UseDirect(PEER, DIRECT, 0.001, "probe answered"))
    await _applied(wg)
    backend.roam(REBOUND)  # the peer's NAT rebinding: the probes will learn it, WireGuard already did
    await wg.handshakes()
    assert backend.endpoint == REBOUND

    wg.decide(PEER, "b", UseRelay(PEER, "heartbeat lost"))
    await _applied(wg)
    assert backend.endpoint == PROXY
    backend.roam(DIRECT)  # the peer went direct first: its packets work from there
    await wg.handshakes()
    assert backend.endpoint == DIRECT


async def test_the_lower_key_gets_its_endpoint_and_keepalive_at_once() -> None:
    backend = RoamingBackend()
    wg = _endpoints(backend, own_key="wg-a")  # "wg-a" < "wg-b": we start the first handshake
    wg.decide(PEER, "b", UseRelay(PEER, "start"))
    await _applied(wg)
    assert backend.sets == [PROXY] and backend.keepalive == KEEPALIVE_SECONDS


async def test_the_higher_key_gives_wireguard_no_endpoint_until_the_first_handshake() -> None:
    """Issue 15: a packet to the peer (the first ping) makes WireGuard initiate too; with no endpoint that
    initiation cannot leave, so it cannot cross the lower key's one (both would end as responders and wait
    5 s). The endpoint decided meanwhile (here: direct) is set once the lower key's handshake is done."""
    backend, clock, wg = await _started("wg-z")
    wg.relay_moved(PEER)  # a UDP relay port came up meanwhile: still nothing for WireGuard
    await _applied(wg)
    wg.decide(PEER, "b", UseDirect(PEER, DIRECT, 0.001, "probe answered"))
    await _applied(wg)
    clock[0] += 0.5
    await wg.handshakes()
    assert backend.sets == [] and backend.endpoint is None, "no endpoint before the first handshake"
    assert not wg.keepalive_on(PEER)
    # the lower key's initiation arrives through the relay: WireGuard answers and roams there
    backend.roam(PROXY)
    backend.last_handshake = 2000.4
    await wg.handshakes()
    assert backend.endpoint == DIRECT and backend.keepalive == KEEPALIVE_SECONDS
    assert wg.keepalive_on(PEER)
    wg.decide(PEER, "b", UseRelay(PEER, "heartbeat lost"))  # from now on decisions apply at once
    await _applied(wg)
    assert backend.endpoint == PROXY


async def test_the_higher_key_starts_itself_when_the_lower_key_stays_silent() -> None:
    backend, clock, wg = await _started("wg-z")
    clock[0] += KEEPALIVE_FALLBACK - 0.01
    await wg.handshakes()
    assert backend.sets == []
    clock[0] += 0.02
    await wg.handshakes()
    assert backend.sets == [PROXY] and backend.keepalive == KEEPALIVE_SECONDS


async def test_the_higher_key_does_not_fall_back_while_the_lower_keys_initiation_is_being_answered() -> None:
    backend, clock, wg = await _started("wg-z")
    backend.rx_bytes = 148  # the lower key's initiation arrived (answered, not yet confirmed)
    clock[0] += KEEPALIVE_FALLBACK + 0.5
    await wg.handshakes()
    assert backend.sets == [], "initiating now would cross the lower key's handshake"


async def test_the_lower_key_initiates_again_when_no_first_handshake_follows() -> None:
    """A crossed or lost first initiation: initiate afresh after RESTART_AFTER, not WireGuard's 5 s."""
    backend, clock, wg = await _started("wg-a")
    clock[0] += RESTART_AFTER - 0.01
    await wg.handshakes()
    assert backend.restarts == 0
    for _ in range(MAX_RESTARTS + 2):
        clock[0] += RESTART_AFTER
        await wg.handshakes()
    assert backend.restarts == MAX_RESTARTS, "bounded: then WireGuard's own retries carry on"


async def test_no_restart_once_the_first_handshake_happened() -> None:
    backend = RoamingBackend()
    clock = [2000.0]
    wg = _endpoints(backend, own_key="wg-a", clock=clock)
    wg.decide(PEER, "b", UseRelay(PEER, "start"))
    await _applied(wg)
    backend.last_handshake = 2000.1
    clock[0] += 3 * RESTART_AFTER
    await wg.handshakes()
    assert backend.restarts == 0


async def test_a_packet_before_the_first_decision_cannot_silence_the_lower_keys_first_initiation() -> None:
    """Issue 15, seen in every slow first ping of time_to_direct: the map added the peer to WireGuard
    without an endpoint, the first ping (the hosts file named the peer already) made wireguard-go try a
    handshake it could not send, and keepalive turned on with the relay endpoint a few ms later sent
    nothing for 5 s: the first handshake waited ~2 s for the restart. Now the lower key's peer is added
    with its relay endpoint, so the first initiation leaves with the peer, whatever comes next."""
    clock = [2000.0]
    wg = _endpoints(RoamingBackend(), own_key="wg-a", clock=clock)
    first = wg.first_endpoint(PEER)
    backend = WireGuardGo(clock, first, KEEPALIVE_SECONDS if first is not None else 0)
    wg.backend = cast(WireGuardBackend, backend)
    clock[0] += 0.01
    backend.packet()  # the first ping, before the relay decision is carried out
    wg.decide(PEER, "b", UseRelay(PEER, "start"))
    await _applied(wg)
    assert backend.initiations == [(2000.0, PROXY)], "the first initiation left at once, to the relay"
    assert backend.keepalive == KEEPALIVE_SECONDS and wg.keepalive_on(PEER)
    assert wg.first_endpoint(PEER) is None, "set once: later maps keep what WireGuard has"


async def test_only_the_lower_key_adds_its_new_peer_with_an_endpoint() -> None:
    wg = _endpoints(RoamingBackend(), own_key="wg-z")
    assert wg.first_endpoint(PEER) is None, "the higher key's WireGuard has no endpoint until a handshake"


async def test_the_higher_keys_fallback_initiates_even_after_its_own_packets_burned_the_attempt() -> None:
    """The higher key's WireGuard has no endpoint, so a packet to the peer burns its attempt; turning
    keepalive on within 5 s of that would send nothing: the fallback restarts the handshake."""
    _, clock, wg = await _started("wg-z")
    wireguard = WireGuardGo(clock, None, 0)
    wg.backend = cast(WireGuardBackend, wireguard)
    clock[0] += KEEPALIVE_FALLBACK - 1.0
    wireguard.packet()
    assert wireguard.initiations == []
    clock[0] += 1.0
    await wg.handshakes()
    assert wireguard.initiations == [(clock[0], PROXY)]


async def test_after_our_key_rotated_the_lower_key_initiates_again_when_no_new_handshake_follows() -> None:
    """tests/netns/test_rotation.py lost 3.2-3.6 s of pings now and then: our first initiation with the new
    key reached the peer before its map had the key, and wireguard-go retried only after 5 s."""
    backend = RoamingBackend()
    clock = [2000.0]
    wg = _endpoints(backend, own_key="wg-a", clock=clock)
    wg.decide(PEER, "b", UseDirect(PEER, DIRECT, 0.001, "probe answered"))
    await _applied(wg)
    backend.last_handshake = 2000.5  # a session with the old key
    clock[0] = 2010.0
    await wg.handshakes()
    assert backend.restarts == 0, "no rotation: that session counts"
    wg.rekeyed()
    clock[0] += RESTART_AFTER - 0.01
    await wg.handshakes()
    assert backend.restarts == 0
    clock[0] += 0.02
    await wg.handshakes()
    assert backend.restarts == 1, "the old key's handshake counts as none: initiate afresh"
    backend.last_handshake = clock[0] + 0.1  # the new key's first handshake
    clock[0] += 3 * RESTART_AFTER
    await wg.handshakes()
    assert backend.restarts == 1


async def test_after_our_key_rotated_the_higher_key_leaves_the_first_initiation_to_the_peer() -> None:
    backend = RoamingBackend()
    clock = [2000.0]
    wg = _endpoints(backend, own_key="wg-z", clock=clock)
    wg.decide(PEER, "b", UseDirect(PEER, DIRECT, 0.001, "probe answered"))
    backend.last_handshake = 2000.5
    await _applied(wg)
    await wg.handshakes()  # the handshake happened: keepalive on, as for any peer
    wg.rekeyed()
    clock[0] += 3 * RESTART_AFTER
    await wg.handshakes()
    assert backend.restarts == 0, "the peer has a new peer (us): it initiates, ours would cross it"
