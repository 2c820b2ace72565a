"""Peer relay signals on the map stream: each kind goes where it belongs, the coordinator's orders only
when they verify, and what is in flight at once is bounded (the coordinator can send faster than sends
and verifications complete)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from nacl.signing import SigningKey

from meshd.proto import peerrelay
from meshd.proto.relayport import PortFlags
from meshd.proto.ticket import Grant
from meshd.relay import peersignals
from meshd.relay.manager import RelayManager
from meshd.relay.peersignals import MAX_IN_FLIGHT, PeerRelaySignals
from tests.eventually import eventually_async

pytestmark = pytest.mark.timeout(30)

ME = 7
COORD = SigningKey(bytes(range(32)))
PEER = bytes([9]) * 32


@dataclass
class Coordinator:
    """The control client's side that the signals use: our node id and the coordinator's signing keys."""

    node_id: int | None = ME
    keys: list[bytes] = field(default_factory=lambda: [bytes(COORD.verify_key)])
    asked: int = 0

    async def map_keys(self, key_id: str) -> Iterable[bytes]:
        self.asked += 1
        return self.keys


async def _tickets(region_id: int) -> Grant:
    return Grant("ticket", time.time() + 3600, lambda m: bytes(64))


class Sender:
    """The map stream's send side; ``gate`` holds every send until set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent: list[tuple[int, dict[str, Any]]] = []

    async def __call__(self, node_id: int, payload: dict[str, Any]) -> None:
        await self.gate.wait()
        self.sent.append((node_id, payload))


def _signals(send: Sender | None = None, coord: Coordinator | None = None) -> PeerRelaySignals:
    relay = RelayManager(wg_key=bytes(32), wg_port=9, tickets=_tickets)
    return PeerRelaySignals(coord or Coordinator(), relay, send or Sender())  # type: ignore[arg-type]


def _use(at: float) -> peerrelay.Use:
    return peerrelay.Use(PEER, 3, "relay-node", "192.0.2.1", 40000, bytes(16), at)


async def test_in_flight_sends_are_bounded_and_the_drop_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    send = Sender()
    s = _signals(send)
    caplog.set_level(logging.WARNING, logger="meshd.peerrelay")
    for i in range(MAX_IN_FLIGHT + 36):
        s.send_soon(i, peerrelay.state_payload(PEER, PortFlags(1)))
    assert s.in_flight == MAX_IN_FLIGHT and s.dropped == 36
    assert len([r for r in caplog.records if "dropping" in r.getMessage()]) == 1
    send.gate.set()
    await eventually_async(lambda: s.in_flight == 0, within=5)
    assert [n for n, _ in send.sent] == list(range(MAX_IN_FLIGHT)), "the first ones went out, in order"
    s.send_soon(1000, peerrelay.state_payload(PEER, PortFlags(1)))  # drained: accepted again
    await eventually_async(lambda: send.sent[-1][0] == 1000, within=5)


async def test_a_flood_of_coordinator_orders_is_bounded_too() -> None:
    coord = Coordinator()
    gate = asyncio.Event()

    async def slow_keys(key_id: str) -> Iterable[bytes]:
        await gate.wait()
        return coord.keys

    coord.map_keys = slow_keys  # type: ignore[method-assign]
    s = _signals(coord=coord)
    payload = peerrelay.encode(_use(time.time()), ME, COORD)
    assert all(s.handle(0, payload) for _ in range(500))
    assert s.in_flight == MAX_IN_FLIGHT and s.dropped == 500 - MAX_IN_FLIGHT
    gate.set()
    await eventually_async(lambda: s.in_flight == 0, within=5)


async def test_a_signed_offer_reaches_the_relay_client_and_a_forged_one_does_not() -> None:
    s = _signals()
    forged = peerrelay.encode(_use(time.time()), ME, SigningKey(bytes(32)))
    forged["key"] = peerrelay.encode(_use(time.time()), ME, COORD)["key"]  # claims the coordinator's key
    assert s.handle(0, forged)
    await eventually_async(lambda: s.in_flight == 0, within=5)
    assert s.relay.udp.offered(PEER) is None
    assert s.handle(0, peerrelay.encode(_use(time.time()), ME, COORD))
    await eventually_async(lambda: s.relay.udp.offered(PEER) is not None, within=5)


async def test_only_the_coordinator_gives_orders_and_other_signals_are_not_ours() -> None:
    coord = Coordinator()
    s = _signals(coord=coord)
    assert s.handle(5, peerrelay.encode(_use(time.time()), ME, COORD)), "a peer relay message, refused"
    assert s.in_flight == 0 and coord.asked == 0
    assert not s.handle(5, {"type": "cmm", "candidates": []}), "call-me-maybe goes to the path strategy"
    assert s.handle(5, {"type": peerrelay.STATE_TYPE, "peer": "bad"}), "a bad state message is dropped here"


async def test_close_cancels_what_is_in_flight_and_refuses_more() -> None:
    send = Sender()
    s = _signals(send)
    s.send_soon(1, peerrelay.state_payload(PEER, PortFlags(1)))
    assert s.in_flight == 1
    s.close()
    await eventually_async(lambda: s.in_flight == 0, within=5)
    s.send_soon(2, peerrelay.state_payload(PEER, PortFlags(1)))
    assert s.in_flight == 0 and send.sent == []


def test_no_server_no_serve_fact() -> None:
    s = _signals()
    assert s.facts(None, ["192.0.2.1"]) is None and peersignals.MAX_IN_FLIGHT == 64
