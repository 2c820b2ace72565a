"""The reconcile diff: exactly what changed, nothing for peers that did not change."""

from __future__ import annotations

from base64 import b64encode

from hypothesis import given
from hypothesis import strategies as st

from meshd.wg.diff import (
    AddPeer,
    RemovePeer,
    SetDevice,
    UpdatePeer,
    desired_routes,
    plan_device,
    plan_set,
)
from meshd.wg.keys import ZERO_KEY_B64, generate_private_key, public_key
from meshd.wg.model import InterfaceConfig, InterfaceState, PeerConfig, PeerState

PRIV = generate_private_key()
A, B, C = (public_key(generate_private_key()) for _ in range(3))
PSK = public_key(generate_private_key())


def live(p: PeerConfig, endpoint: tuple[str, int] | None = None) -> PeerState:
    """What a backend reports for a configured peer that has a session."""
    return PeerState(p.public_key, endpoint or p.endpoint, p.allowed_ips, 1.7e9, 100, 200,
                     p.persistent_keepalive, p.preshared_key)


def state(*peers: PeerState, port: int = 41641, fwmark: int = 0) -> InterfaceState:
    return InterfaceState("wg0", public_key(PRIV), port, fwmark, peers)


def config(*peers: PeerConfig, port: int = 0, fwmark: int = 0) -> InterfaceConfig:
    return InterfaceConfig("wg0", PRIV, port, fwmark, peers=peers)


pa = PeerConfig(A, ("100.64.0.2/32",), ("6.0.0.2", 41641), 25)
pb = PeerConfig(B, ("100.64.0.3/32", "fd7a::3/128"), None, 0, PSK)


def test_nothing_changed_nothing_to_do() -> None:
    assert plan_device(config(pa, pb), state(live(pa), live(pb))) == []


def test_fresh_interface_gets_key_and_all_peers() -> None:
    empty = InterfaceState("wg0", None, 0, 0, ())
    assert plan_device(config(pa, pb, port=51820), empty) == [
        SetDevice(private_key=PRIV, listen_port=51820), AddPeer(pa), AddPeer(pb),
    ]


def test_add_and_remove_leave_the_unchanged_peer_alone() -> None:
    pc = PeerConfig(C, ("100.64.0.4/32",))
    ops = plan_device(config(pa, pc), state(live(pa), live(pb)))
    assert ops == [RemovePeer(B), AddPeer(pc)]


def test_listen_port_zero_never_moves_a_bound_port() -> None:
    assert plan_device(config(pa, port=0), state(live(pa), port=3333)) == []
    assert plan_device(config(pa, port=4444), state(live(pa), port=3333)) == [SetDevice(listen_port=4444)]


def test_changed_fields_only() -> None:
    moved = PeerConfig(A, ("100.64.0.2/32", "10.0.0.0/24"), ("6.0.0.9", 1), 25)
    ops = plan_device(config(moved), state(live(pa)))
    assert ops == [UpdatePeer(A, endpoint=("6.0.0.9", 1), allowed_ips=("10.0.0.0/24", "100.64.0.2/32"))]


def test_no_desired_endpoint_keeps_a_roamed_endpoint() -> None:
    roamed = live(pb, endpoint=("6.0.0.77", 9999))
    assert plan_device(config(pb), state(roamed)) == []


def test_preshared_key_removed_with_zero_key_and_private_key_change() -> None:
    no_psk = PeerConfig(B, pb.allowed_ips)
    assert plan_device(config(no_psk), state(live(pb))) == [UpdatePeer(B, preshared_key=ZERO_KEY_B64)]
    other = generate_private_key()
    cfg = InterfaceConfig("wg0", other, peers=(pa,))
    assert plan_device(cfg, state(live(pa))) == [SetDevice(private_key=other)]
    assert other not in repr(cfg)
    assert other not in repr(SetDevice(private_key=other))


def test_routes_are_every_allowed_ip_but_default_routes() -> None:
    exit_node = PeerConfig(C, ("0.0.0.0/0", "::/0", "10.1.0.0/16"))
    assert desired_routes(config(pa, pb, exit_node)) == {
        "100.64.0.2/32", "100.64.0.3/32", "fd7a::3/128", "10.1.0.0/16",
    }
    plan = plan_set({"a", "b"}, {"b", "c"})
    assert (plan.add, plan.remove) == (("a",), ("c",))


keys = st.sampled_from([A, B, C, public_key(generate_private_key()), public_key(generate_private_key())])
nets = st.lists(st.sampled_from(["10.0.0.0/8", "100.64.0.1/32", "fd00::/64", "10.9.0.0/16"]), max_size=3)
eps = st.none() | st.tuples(st.sampled_from(["6.0.0.1", "127.0.0.1", "fd00::1"]), st.integers(1, 3))
psks = st.none() | st.binary(min_size=32, max_size=32).map(lambda b: b64encode(b).decode())
peer_configs = st.builds(PeerConfig, keys, nets.map(tuple), eps, st.integers(0, 2), psks)
peer_sets = st.lists(peer_configs, max_size=5, unique_by=lambda p: p.public_key)


def apply_ops(actual: InterfaceState, ops: list) -> InterfaceState:
    """A model of what WireGuard does with these operations (the semantics the backends rely on)."""
    peers = {p.public_key: p for p in actual.peers}
    pub, port, mark = actual.public_key, actual.listen_port, actual.fwmark
    for op in ops:
        if isinstance(op, SetDevice):
            pub = public_key(op.private_key) if op.private_key else pub
            port = op.listen_port if op.listen_port is not None else port
            mark = op.fwmark if op.fwmark is not None else mark
        elif isinstance(op, RemovePeer):
            del peers[op.public_key]
        elif isinstance(op, AddPeer):
            assert op.peer.public_key not in peers
            peers[op.peer.public_key] = PeerState(
                op.peer.public_key, op.peer.endpoint, op.peer.allowed_ips, None, 0, 0,
                op.peer.persistent_keepalive, op.peer.preshared_key,
            )
        elif isinstance(op, UpdatePeer):
            old = peers[op.public_key]
            psk = old.preshared_key if op.preshared_key is None else op.preshared_key
            peers[op.public_key] = PeerState(
                old.public_key,
                op.endpoint or old.endpoint,
                old.allowed_ips if op.allowed_ips is None else op.allowed_ips,
                old.last_handshake, old.rx_bytes, old.tx_bytes,
                old.persistent_keepalive if op.persistent_keepalive is None else op.persistent_keepalive,
                None if psk == ZERO_KEY_B64 else psk,
            )
    return InterfaceState(actual.name, pub, port, mark, tuple(peers.values()))


@given(peer_sets, peer_sets, st.integers(0, 2), st.integers(0, 2))
def test_applying_the_plan_reaches_desired_and_touches_only_changed_peers(
    before: list[PeerConfig], after: list[PeerConfig], mark0: int, mark1: int
) -> None:
    actual = state(*(live(p) for p in before), fwmark=mark0)
    desired = config(*after, fwmark=mark1)
    ops = plan_device(desired, actual)
    result = apply_ops(actual, ops)
    assert plan_device(desired, result) == []  # converged: a second diff is empty
    assert result.fwmark == mark1 and {p.public_key for p in result.peers} == {p.public_key for p in after}
    touched = {getattr(op, "public_key", None) or getattr(getattr(op, "peer", None), "public_key", None)
               for op in ops}
    for p in after:
        old = actual.peer(p.public_key)
        new = result.peer(p.public_key)
        assert new is not None
        if old is not None and p == PeerConfig(old.public_key, old.allowed_ips, p.endpoint and old.endpoint,
                                               old.persistent_keepalive, old.preshared_key):
            assert p.public_key not in touched  # unchanged live peer: no operation at all
            assert new == old
