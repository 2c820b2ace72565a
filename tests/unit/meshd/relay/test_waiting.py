"""Relayed handshake messages from a peer this host's WireGuard does not have yet wait for it (issue 15)."""

from __future__ import annotations

import socket
import time

from meshd.proto.encoding import b64encode
from meshd.proto.ticket import Grant
from meshd.relay.manager import RelayManager
from meshd.relay.waiting import HOLD_MAX_BYTES, HOLD_PER_PEER, HOLD_SECONDS, HOLD_TOTAL, Waiting

A, B = bytes(range(32)), bytes(range(1, 33))
INIT = b"\x01" + bytes(147)  # the size of a handshake initiation


async def _ticket(region_id: int) -> Grant:
    raise AssertionError("no relay link in these tests")


async def test_an_initiation_that_comes_before_wireguard_has_the_peer_is_delivered_once_it_does() -> None:
    """Two daemons starting together: the lower key initiates the moment its WireGuard adds the peer, and
    the relay may deliver that before our map or WireGuard has the sender. It used to be dropped here (and
    the first handshake waited for the sender's restart, a second or more); now it waits for WireGuard."""
    wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # stands in for WireGuard's port
    wg.bind(("127.0.0.1", 0))
    wg.setblocking(False)
    m = RelayManager(wg_key=bytes(32), wg_port=wg.getsockname()[1], tickets=_ticket)
    try:
        m.configured([])  # the first map, without the peer
        m.received(A, INIT)  # its initiation, through the relay, before our map names it
        m.set_peers([(b64encode(A), 1)])
        m.received(A, INIT[:64])  # ... or after the map, before WireGuard has it
        assert _drain(wg) == [], "WireGuard would drop a message from a key it does not have"
        m.configured([b64encode(A)])  # the reconcile added it
        assert _drain(wg) == [INIT, INIT[:64]]
        m.received(A, b"data")  # from now on straight through
        assert _drain(wg) == [b"data"]
    finally:
        await m.close()
        wg.close()


async def test_until_told_which_peers_wireguard_has_every_map_peer_is_delivered_as_before() -> None:
    wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg.bind(("127.0.0.1", 0))
    wg.setblocking(False)
    m = RelayManager(wg_key=bytes(32), wg_port=wg.getsockname()[1], tickets=_ticket)
    try:
        m.set_peers([(b64encode(A), 1)])
        m.received(A, INIT)
        m.received(B, INIT)  # not in the map: dropped
        assert _drain(wg) == [INIT] and len(m.waiting) == 0
    finally:
        await m.close()
        wg.close()


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    deadline = time.monotonic() + 0.5  # loopback delivery is synchronous; the deadline only bounds a bug
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(65535))
        except BlockingIOError:
            break
    return out


def test_only_small_recent_packets_wait_a_few_per_sender_and_a_bounded_number_in_all() -> None:
    w = Waiting()
    assert not w.hold(A, bytes(HOLD_MAX_BYTES + 1), 0.0), "data is not held"
    for i in range(HOLD_PER_PEER + 2):
        assert w.hold(A, bytes([i]), 0.0)
    assert w.take(A, 1.0) == [bytes([i]) for i in range(2, HOLD_PER_PEER + 2)], "the newest ones"
    assert w.take(A, 1.0) == [] and len(w) == 0
    w.hold(B, INIT, 0.0)
    assert w.take(B, HOLD_SECONDS + 0.1) == [], "too old to matter"
    for i in range(HOLD_TOTAL):
        assert w.hold(i.to_bytes(32, "big"), INIT, 0.0)
    assert not w.hold(A, INIT, 1.0), "full"
    assert w.hold(A, INIT, HOLD_SECONDS + 1.0), "room is made by forgetting what is too old"
    assert len(w) == 1
