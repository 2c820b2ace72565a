"""Hostile: a node the policy does not allow cannot get or use an allocation on a peer relay (issue 14).

A peer relay takes allocations only from the coordinator's signed ``serve`` signals, and the coordinator
offers a relay only to pairs whose both sides the policy lets talk to it. Mallory, who knows the relay's
address and ports and has seen the honest pair's traffic, tries: to forge a ``serve`` (own key, a
``serve`` signed for another node, an old one), to get the planner to offer her the relay when the
policy keeps her from it, and to use the honest pair's ports (WireGuard-shaped packets from her own
address, binds without the secret or with the other side's). The positive control: the honest pair's
packets cross the real port server (meshd/relay/peerrelay.py, userspace, loopback) after every attempt.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import pytest
from nacl.signing import SigningKey

from coordinator.peerrelays import Inputs, Server, choose
from meshd.proto import peerrelay, relayport
from meshd.proto.relayport import Assigned
from meshd.relay.peerrelay import PeerRelayServer
from tests.hostile.test_relay_ports import _recv, _udp

pytestmark = pytest.mark.hostile

A, B, M = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
RELAY_NODE = 7
WG_DATA = bytes([4, 0, 0, 0]) + os.urandom(60)  #: shaped like a WireGuard transport message


def test_the_planner_never_offers_the_relay_to_a_node_the_policy_keeps_from_it() -> None:
    # mallory (3) and alice (1) may talk; mallory may not talk to the relay (7): although it is by far
    # the closest for that pair, it is not offered; alice and bob (2) both may use it and get it
    allowed = {frozenset(p) for p in ((1, 2), (1, 3), (1, 7), (2, 7))}
    inp = Inputs(
        direct_ms={(1, 7): 1.0, (2, 7): 1.0, (3, 7): 1.0},
        region_ms={1: 80.0, 2: 80.0, 3: 80.0},
        may_talk=lambda a, b: frozenset((a, b)) in allowed,
    )
    relay = [Server(RELAY_NODE, "203.0.113.7", range(41800, 41900))]
    assert choose(1, 3, relay, inp) is None
    assert choose(1, 2, relay, inp) == RELAY_NODE  # the positive control


def test_the_relay_takes_only_the_coordinators_serve_for_itself_and_fresh() -> None:
    coordinator, mallory = SigningKey.generate(), SigningKey.generate()
    trusted = [bytes(coordinator.verify_key)]
    serve = peerrelay.Serve(
        Assigned(A, 1, 41800, os.urandom(16)), Assigned(M, 3, 41801, os.urandom(16)), time.time()
    )
    forged: list[dict[str, Any]] = [
        peerrelay.encode(serve, RELAY_NODE, mallory),  # her own key
        peerrelay.encode(serve, RELAY_NODE + 1, coordinator),  # one the coordinator made for another node
        peerrelay.encode(
            peerrelay.Serve(serve.a, serve.b, time.time() - 2 * peerrelay.MAX_AGE), RELAY_NODE, coordinator
        ),  # an old one, replayed
    ]
    tampered = peerrelay.encode(serve, RELAY_NODE, coordinator)
    tampered["body"]["b"]["key"] = peerrelay.body_to_json(peerrelay.Drop(B, 0.0))["peer"]
    forged.append(tampered)
    for payload in forged:
        with pytest.raises(peerrelay.PeerRelayError):
            peerrelay.decode(payload, RELAY_NODE, trusted, time.time())
    # the positive control: the coordinator's own, for this node, now
    ok = peerrelay.decode(peerrelay.encode(serve, RELAY_NODE, coordinator), RELAY_NODE, trusted, time.time())
    assert ok == serve


async def test_mallory_cannot_use_the_honest_pairs_ports() -> None:
    base = random.randrange(42000, 60000)
    sent: list[tuple[int, dict[str, Any]]] = []
    server = PeerRelayServer(
        range(base, base + 10),
        lambda node, payload: sent.append((node, payload)),
        kernel=False,
        host="127.0.0.1",
    )
    sa, sb, sm = _udp(), _udp(), _udp()
    secret_a, secret_b = os.urandom(16), os.urandom(16)
    pa, pb = base, base + 1
    try:
        server.handle(
            peerrelay.Serve(Assigned(A, 1, pa, secret_a), Assigned(B, 2, pb, secret_b), time.time())
        )
        assert server.allocations == 1
        await asyncio.sleep(0.05)  # the port sockets attach to the loop
        bind_a = relayport.encode_bind(secret_a, pa, 1)
        sa.sendto(bind_a, ("127.0.0.1", pa))
        sb.sendto(relayport.encode_bind(secret_b, pb, 1), ("127.0.0.1", pb))
        await asyncio.sleep(0.05)
        # both sides are told, through the coordinator, that the pair is ready
        ready = {(n, p["flags"]) for n, p in sent}
        assert (1, int(relayport.PortFlags.READY)) in ready and (2, int(relayport.PortFlags.READY)) in ready

        async def honest_pair_works() -> None:
            sa.sendto(WG_DATA, ("127.0.0.1", pa))
            assert await _recv(sb) == WG_DATA
            sb.sendto(WG_DATA, ("127.0.0.1", pb))
            assert await _recv(sa) == WG_DATA

        await honest_pair_works()
        # WireGuard-shaped packets from mallory's address on both ports, and on a free port: dropped
        for port in (pa, pb, base + 5):
            sm.sendto(WG_DATA, ("127.0.0.1", port))
        assert await _recv(sa) is None and await _recv(sb) is None
        # binds without the secret, with the other side's secret, a replay of A's: A stays where it was
        for data in (
            relayport.encode_bind(os.urandom(16), pa, 99),
            relayport.encode_bind(secret_b, pa, 99),
            bind_a,
        ):
            sm.sendto(data, ("127.0.0.1", pa))
        await asyncio.sleep(0.1)
        assert server.core.by_port[pa].addr == sa.getsockname()
        sm.sendto(WG_DATA, ("127.0.0.1", pa))
        assert await _recv(sb) is None
        assert await _recv(sm, 0.2) is None  # the relay never sent mallory anything
        assert server.core.bad_binds >= 3
        await honest_pair_works()
        # the coordinator withdraws the pair: its ports close
        server.handle(peerrelay.Stop(A, B, time.time()))
        assert server.allocations == 0
        sa.sendto(WG_DATA, ("127.0.0.1", pa))
        assert await _recv(sb) is None
    finally:
        server.close("test over")
        for s in (sa, sb, sm):
            s.close()
