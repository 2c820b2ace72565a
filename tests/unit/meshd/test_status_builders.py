"""meshd.status builders: the peer row shows the path strategy's decision; netcheck's document shape."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from meshd import status as st
from meshd.paths import PathKind, PathStatus
from meshd.proto.endpoint import Endpoint
from meshd.wg.keys import generate_private_key, public_key
from meshd.wg.model import PeerState

KEY = public_key(generate_private_key())


def wg(
    last_handshake: float | None = 1_767_225_600.0, endpoint: Endpoint | None = ("127.0.0.1", 40001)
) -> PeerState:
    return PeerState(KEY, endpoint, ("100.64.0.2/32",), last_handshake, 10, 20, 25)


def row(decision: PathStatus, state: PeerState | None = None, pinged: float | None = None) -> st.PeerStatus:
    return st.peer_status(
        name="b",
        ips=("100.64.0.2/32",),
        public_key=KEY,
        decision=decision,
        wg=state,
        relay="home",
        pinged_ms=pinged,
    )


def test_a_direct_path_shows_its_endpoint_and_the_probe_round_trip() -> None:
    r = row(PathStatus(PathKind.DIRECT, ("198.51.100.7", 41641), 0.0123), wg())
    assert (r.path, r.endpoint, r.latency_ms) == ("direct", "198.51.100.7:41641", 12.3)
    assert r.last_handshake == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert (r.rx_bytes, r.tx_bytes) == (10, 20)


def test_the_relay_proxy_address_wireguard_uses_is_never_shown_as_an_endpoint() -> None:
    r = row(PathStatus(PathKind.RELAY, None, None), wg(), pinged=4.5)
    assert (r.path, r.endpoint, r.latency_ms, r.relay) == ("relay", None, 4.5, "home")


def test_a_fresh_handshake_does_not_turn_a_none_decision_into_a_path() -> None:
    """Status reads the decision; it adds nothing of its own (the relay may be down)."""
    r = row(st.NO_PATH, wg())
    assert (r.path, r.endpoint) == ("none", None)


def test_a_peer_wireguard_does_not_know_yet_has_zero_counters() -> None:
    r = row(st.NO_PATH, None)
    assert (r.last_handshake, r.rx_bytes, r.tx_bytes) == (None, 0, 0)


@dataclass
class Nat:
    reflexive: dict[Endpoint, Endpoint] = field(default_factory=dict)
    portmap: str | None = None
    portmapped: Endpoint | None = None

    @property
    def mapping_varies_by_dest(self) -> bool | None:
        return None if len(self.reflexive) < 2 else len(set(self.reflexive.values())) > 1


@dataclass(frozen=True)
class Region:
    id: int
    name: str
    rtt_ms: float | None
    connected: bool
    transport: str | None


def test_netcheck_document() -> None:
    nat = Nat(
        {("192.0.2.1", 3478): ("203.0.113.5", 61000), ("192.0.2.1", 3479): ("203.0.113.5", 61000)},
        "natpmp",
        ("203.0.113.5", 41641),
    )
    doc = st.netcheck(nat, ["natpmp", "pcp"], [Region(1, "home", 1.5, True, "tcp")], "home")
    assert doc == {
        "udp": True,
        "public_addresses": ["203.0.113.5:61000"],
        "mapping_varies_by_dest": False,
        "portmap": {
            "upnp": False,
            "natpmp": True,
            "pcp": True,
            "active": "natpmp",
            "mapped": "203.0.113.5:41641",
        },
        "relays": [{"id": 1, "name": "home", "latency_ms": 1.5, "connected": True, "transport": "tcp"}],
        "preferred_relay": "home",
    }


def test_netcheck_before_anything_was_learnt() -> None:
    doc = st.netcheck(st.NO_NAT, [], [], None)
    assert doc["udp"] is False and doc["public_addresses"] == [] and doc["mapping_varies_by_dest"] is None
    assert doc["portmap"]["mapped"] is None and doc["relays"] == [] and doc["preferred_relay"] is None
