"""WgEndpoints: path decisions carried out on WireGuard, and WireGuard's roaming kept in line with them."""

from __future__ import annotations

import asyncio
from typing import cast

from meshd.nat.endpoints import WgEndpoints
from meshd.paths import UseDirect, UseRelay
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

    def roam(self, src: Endpoint) -> None:
        self.endpoint = src

    async def state(self) -> InterfaceState:
        peer = PeerState(PEER, self.endpoint, ("100.64.0.2/32",), 1000.0, 0, 0, 25)
        return InterfaceState("mesh0", None, 41641, 0, (peer,))

    async def set_endpoint(
        self, public_key: str, endpoint: Endpoint, persistent_keepalive: int | None = None
    ) -> None:
        assert public_key == PEER
        self.endpoint = endpoint
        self.sets.append(endpoint)


async def _applied(wg: WgEndpoints) -> None:
    task = asyncio.create_task(wg.apply_loop())
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()


def _endpoints(backend: RoamingBackend) -> WgEndpoints:
    return WgEndpoints(
        cast(WireGuardBackend, backend),
        relay_endpoint=lambda key: PROXY if key == PEER else None,
        own_key=lambda: "wg-a",
        clock=lambda: 2000.0,
        wall=lambda: 2000.0,
    )


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
