"""meshd.mapapply: what a map does to the host, in order; an unverified peer is never configured."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from meshd import firewall, hosts
from meshd.control import ControlError, Enrollment, NodeKeys
from meshd.credentials import Credentials
from meshd.mapapply import MapApplier
from meshd.proto import cert, netmap
from meshd.proto.encoding import b64encode
from meshd.proto.policy import ALLOW_ALL
from meshd.state import NodeState, StateDir
from meshd.wg.errors import WgError
from meshd.wg.model import InterfaceConfig

COORD = SigningKey.generate()
COORD_PUB = bytes(COORD.verify_key)
ROGUE = SigningKey.generate()


def peer(node_id: int, name: str, signer: SigningKey = COORD) -> netmap.Peer:
    keys = NodeKeys.generate()
    wg, node = b64encode(keys.wg_public), b64encode(keys.node_public)
    ips = (f"100.64.0.{node_id}/32",)
    now = int(time.time())
    payload = cert.CertPayload(
        1, 1, name, node_id, ips, wg, node, (), now - 1, now + 600, cert.key_id(bytes(signer.verify_key))
    )
    return netmap.Peer(node_id, name, ips, wg, node, cert.issue(payload, bytes(signer)))


class Recorder:
    """Stands in for the firewall, WireGuard and the hosts file; records the order of calls."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.fail_wg = False
        self.fail_fw = False
        self.desired: InterfaceConfig | None = None

    async def update(self, inbound: Any) -> None:  # firewall
        self.calls.append("firewall")
        if self.fail_fw:
            raise firewall.FirewallError("nft: Operation not permitted")

    async def apply(self, desired: InterfaceConfig) -> list[object]:  # WireGuard
        if self.fail_wg:
            raise WgError("wireguard-go went away")
        self.calls.append("wireguard")
        self.desired = desired
        return []


class Hosts(hosts.HostsFile):
    def __init__(self, path: Path, calls: list[str]) -> None:
        super().__init__(path, tag="mtest0")
        self.calls = calls

    def update(self, entries: Any) -> bool:
        self.calls.append("hosts")
        return super().update(entries)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[MapApplier, Recorder, list[str], Path]:
    store = StateDir(tmp_path / "state")
    state: NodeState = store.load_or_create()
    me = peer(1, "a")
    e = Enrollment(1, "a", me.ips, me.cert, COORD_PUB, (COORD_PUB,), "mesh", "100.64.0.0/10", "fd7a::/48")
    state = state.with_enrollment("http://coord:8080", e)

    class Client:
        async def signing_keys(self) -> object:  # asked when a rogue issuer shows up: nothing endorsed
            raise ControlError("coordinator said 404", 404)

    creds = Credentials(store, state, Client(), clock=time.time)  # type: ignore[arg-type]
    calls: list[str] = []
    rec = Recorder(calls)
    hosts_path = tmp_path / "hosts"
    hosts_path.write_text("127.0.0.1 localhost\n")
    applier = MapApplier(
        interface="mtest0",
        listen_port=41641,
        creds=creds,
        backend=rec,  # type: ignore[arg-type]
        fw=rec,  # type: ignore[arg-type]
        hosts_file=Hosts(hosts_path, calls),
        clock=time.time,
    )
    return applier, rec, calls, hosts_path


def a_map(version: int, *peers: netmap.Peer) -> netmap.NetMap:
    return netmap.NetMap(version, peer(1, "a"), tuple(peers), (), "", "mesh", ALLOW_ALL)


async def test_firewall_before_wireguard_before_hosts(setup: Any) -> None:
    applier, _, calls, _ = setup
    await applier.apply(a_map(1, peer(2, "b")))
    assert calls == ["firewall", "wireguard", "hosts"]  # a newly visible peer never finds an open door


async def test_a_peer_whose_certificate_does_not_verify_is_never_configured(setup: Any) -> None:
    applier, rec, _, hosts_path = setup
    good, forged = peer(2, "b"), peer(3, "mallory", signer=ROGUE)
    await applier.apply(a_map(1, good, forged))
    assert [p.public_key for p in rec.desired.peers] == [good.wg_public_key]
    assert [v.name for v in applier.verified] == ["b"]
    assert "mallory" not in hosts_path.read_text() and " b" in hosts_path.read_text()


async def test_the_map_counts_as_applied_only_once_wireguard_took_it(setup: Any) -> None:
    """After a WgError the session resumes from the previous version, so the change comes again."""
    applier, rec, _, _ = setup
    await applier.apply(a_map(1, peer(2, "b")))
    rec.fail_wg = True
    with pytest.raises(WgError):
        await applier.apply(a_map(2, peer(2, "b"), peer(3, "c")))
    assert applier.map is not None and applier.map.version == 1


async def test_dropping_peers_empties_wireguard_and_the_hosts_block(setup: Any) -> None:
    applier, rec, _, hosts_path = setup
    await applier.apply(a_map(1, peer(2, "b")))
    await applier.drop_peers()
    assert rec.desired.peers == () and applier.verified == []
    assert hosts_path.read_text().count("100.64.0.2") == 0


async def test_when_the_firewall_fails_no_peer_is_configured_and_the_reason_is_kept(setup: Any) -> None:
    """Fail closed (issue 13): a peer whose inbound rules are not in force would reach every port here."""
    applier, rec, _, hosts_path = setup
    await applier.apply(a_map(1, peer(2, "b")))
    assert len(rec.desired.peers) == 1 and applier.firewall_error is None
    rec.fail_fw = True
    await applier.apply(a_map(2, peer(2, "b"), peer(3, "c")))
    assert rec.desired.peers == () and applier.verified == []
    assert applier.firewall_error == "nft: Operation not permitted"
    assert "100.64.0.2" not in hosts_path.read_text()
    assert applier.map is not None and applier.map.version == 2
    rec.fail_fw = False  # the next map's rules install: the peers come back, the reason goes
    await applier.apply(a_map(3, peer(2, "b"), peer(3, "c")))
    assert len(rec.desired.peers) == 2 and applier.firewall_error is None


async def test_peer_by_name_accepts_the_mesh_domain(setup: Any) -> None:
    applier, _, _, _ = setup
    await applier.apply(a_map(1, peer(2, "b")))
    assert applier.peer_by_name("b.mesh") is applier.verified[0]
    assert applier.peer_by_name("c") is None


async def test_a_map_from_a_newly_endorsed_key_is_verified_after_one_fetch(tmp_path: Path) -> None:
    """Signing-key rotation: the first map signed by the new key names a key id meshd does not know. It
    fetches the announced keys once, trusts the endorsed one, and the map verifies; a key nobody endorsed
    is fetched for once, then refused without asking again."""
    from meshd.control import ControlClient, MapRefused, check_map
    from meshd.proto import trust

    store = StateDir(tmp_path / "state")
    me = peer(1, "a")
    e = Enrollment(1, "a", me.ips, me.cert, COORD_PUB, (COORD_PUB,), "mesh", "100.64.0.0/10", "fd7a::/48")
    state = store.load_or_create().with_enrollment("http://coord:8080", e)
    new = SigningKey.generate()
    asked: list[int] = []

    class Client(ControlClient):
        def __init__(self) -> None:
            self.map_keys = None

        async def signing_keys(self) -> tuple[trust.AnnouncedKey, ...]:
            asked.append(1)
            endorsed = trust.AnnouncedKey(
                bytes(new.verify_key), COORD_PUB, trust.endorse(bytes(COORD), bytes(new.verify_key))
            )
            return (endorsed, trust.AnnouncedKey(COORD_PUB))

    client = Client()
    creds = Credentials(store, state, client, clock=time.time)
    assert client.map_keys == creds.map_signing_keys, "meshd never takes a map unverified"
    m = a_map(5, peer(2, "b"))
    signed = netmap.decode_server_message(netmap.encode_signed(netmap.MapMessage(m), 1, new))
    assert isinstance(signed, netmap.MapMessage)
    await check_map(signed, 1, client.map_keys)
    assert asked == [1] and bytes(new.verify_key) in creds.trusted_keys
    await check_map(signed, 1, client.map_keys)
    assert asked == [1], "a known key needs no fetch"
    rogue = netmap.decode_server_message(netmap.encode_signed(netmap.MapMessage(m), 1, ROGUE))
    assert isinstance(rogue, netmap.MapMessage)
    for _ in range(3):
        with pytest.raises(MapRefused, match="unknown key"):
            await check_map(rogue, 1, client.map_keys)
    assert asked == [1, 1], "an unknown key is asked about once"


async def test_the_relay_is_told_which_peers_wireguard_has_only_once_it_has_them(setup: Any) -> None:
    """A new peer's relayed handshake waits in the relay client until WireGuard has the peer
    (meshd.relay.waiting): so the relay hears it after the reconcile, and not at all when it failed."""
    applier, rec, calls, _ = setup

    class Relay:
        def set_regions(self, regions: object) -> None:
            calls.append("relay regions")

        def set_peers(self, peers: object) -> None:
            calls.append("relay peers")

        def configured(self, keys: Any) -> None:
            calls.append(f"relay: wireguard has {sorted(keys)}")

    b = peer(2, "b")
    applier.relay = Relay()
    await applier.apply(a_map(1, b))
    has_b = f"relay: wireguard has {[b.wg_public_key]}"
    assert calls == ["firewall", "relay regions", "relay peers", "wireguard", has_b, "hosts"]
    calls.clear()
    rec.fail_wg = True
    with pytest.raises(WgError):
        await applier.apply(a_map(2, b, peer(3, "c")))
    assert not [c for c in calls if c.startswith("relay: wireguard has")]
