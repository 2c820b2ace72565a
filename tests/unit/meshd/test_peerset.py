"""Which map peers get configured: only those whose certificate verifies and matches the map."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from nacl.signing import SigningKey

from meshd import peerset
from meshd.proto import cert
from meshd.proto.netmap import NetMap, Peer
from meshd.wg.keys import generate_private_key, public_key

CA = SigningKey.generate()
CA_PUB = bytes(CA.verify_key)
NOW = 1_800_000_000


def _peer(node_id: int, name: str, ip: str, *, not_after: int = NOW + 3600, ca: SigningKey = CA) -> Peer:
    wg = public_key(generate_private_key())
    node_key = public_key(generate_private_key())
    payload = cert.CertPayload(
        version=cert.CERT_VERSION,
        serial=node_id,
        name=name,
        node_id=node_id,
        ips=(f"{ip}/32",),
        wg_public_key=wg,
        node_public_key=node_key,
        tags=(),
        not_before=NOW - 60,
        not_after=not_after,
        issuer=cert.key_id(bytes(ca.verify_key)),
    )
    c = cert.issue(payload, bytes(ca))
    return Peer(node_id, name, (f"{ip}/32",), wg, node_key, c, endpoints=("6.0.0.2:41641",))


def _map(*peers: Peer) -> NetMap:
    me = _peer(1, "me", "100.64.0.1")
    return NetMap(version=3, self_node=me, peers=peers, relays=(), policy="", domain="mesh")


def test_only_verified_matching_peers_are_configured() -> None:
    good = _peer(2, "b", "100.64.0.2")
    expired = _peer(3, "c", "100.64.0.3", not_after=NOW - 1)
    forged = _peer(4, "d", "100.64.0.4", ca=SigningKey.generate())
    swapped = replace(_peer(5, "e", "100.64.0.5"), wg_public_key=good.wg_public_key)
    moved = replace(_peer(6, "f", "100.64.0.6"), ips=("100.64.0.99/32",))
    ok, bad = peerset.verify_peers(_map(good, expired, forged, swapped, moved), [CA_PUB], NOW)
    assert [v.name for v in ok] == ["b"]
    reasons = {r.name: r.reason for r in bad}
    assert reasons["c"] == "certificate: expired"
    assert reasons["d"].startswith("certificate: unknown issuer")
    assert reasons["e"] == "certificate does not match the map entry"
    assert reasons["f"] == "certificate addresses differ from the map"


def test_wg_peers_and_hosts_follow_the_certificate() -> None:
    ok, _ = peerset.verify_peers(_map(_peer(2, "b", "100.64.0.2")), [CA_PUB], NOW)
    [pc] = peerset.wg_peers(ok, lambda v: ("6.0.0.2", 41641))
    assert pc.allowed_ips == ("100.64.0.2/32",)
    assert pc.endpoint == ("6.0.0.2", 41641)
    assert pc.persistent_keepalive == peerset.KEEPALIVE_SECONDS
    assert peerset.host_entries(ok) == [("100.64.0.2", "b")]


def test_candidate_choice_prefers_our_lan_then_public() -> None:
    lan = {"eth0": ipaddress.ip_network("10.1.0.0/24")}
    cands = peerset.parse_candidates(["10.9.0.5:1", "garbage", "[fd00::1]:2", "10.1.0.7:3", "6.0.0.3:4"])
    assert cands == [("10.9.0.5", 1), ("fd00::1", 2), ("10.1.0.7", 3), ("6.0.0.3", 4)]
    assert peerset.first_reachable_candidate(cands, lan) == ("10.1.0.7", 3)
    assert peerset.first_reachable_candidate(cands, {}) == ("6.0.0.3", 4)
    assert peerset.first_reachable_candidate(cands[:2], {}) is None
