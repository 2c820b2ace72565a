"""Views (issue 16): a delta shared by a view is what each of its members would have got on its own.

For any history of joins, changes, endpoint updates, removals and policies, every node that was at one
version gets, from the one shared message of its view, exactly its own current map; the message verifies
for each of them (their maps carry the token) and for no node of another view or touched by the change.
"""

from __future__ import annotations

from hypothesis import given, settings
from nacl.signing import SigningKey

from coordinator.mapstate import Change, MapState
from meshd.proto import netmap
from meshd.proto.netmap import RelayRegion
from tests.unit.coordinator.test_mapstate import POLICIES, ops, peer

KEY = SigningKey(bytes(range(32)))
TRUSTED = [bytes(KEY.verify_key)]


def apply_ops(state: MapState, seq: list[tuple[str, int]], version: int) -> int:
    for n, (op, i) in enumerate(seq):
        version += 1
        if op == "policy":
            state.policy = POLICIES[(version + i) % len(POLICIES)]
            state.record(Change(version, "policy", None))
        elif op == "add" and i not in state.peers:
            state.owners[i] = f"u{i % 3}"
            state.put_peer(peer(i))
            state.record(Change(version, "added", i))
        elif op == "change" and i in state.peers:
            state.put_peer(peer(i, n + 1))
            state.record(Change(version, "changed", i))
        elif op == "endpoints" and i in state.peers:
            state.set_endpoints(i, (f"6.0.0.{n}:1",), n % 2 == 0)
            state.record(Change(version, "endpoints", i))
        elif op == "remove" and i in state.peers:
            state.drop_peer(i)
            state.record(Change(version, "removed", i))
        else:
            version -= 1
    return version


def decoded(text: str) -> netmap.DeltaMessage:
    msg = netmap.decode_server_message(text)
    assert isinstance(msg, netmap.DeltaMessage)
    return msg


@settings(max_examples=200, deadline=None)
@given(before=ops, after=ops)
def test_a_shared_delta_gives_every_member_its_own_map_and_no_one_else_anything(
    before: list[tuple[str, int]], after: list[tuple[str, int]]
) -> None:
    state = MapState("mesh", (RelayRegion(1, "default", "http://c", 3478),), signing_seed=lambda: bytes(32))
    key = [bytes(SigningKey(bytes(32)).verify_key)]
    version = apply_ops(state, [("add", i) for i in range(1, 7)] + before, 0)
    held = {i: state.full_map(i) for i in state.peers}
    since = version
    apply_ops(state, after, version)
    pending = state.pending_since(since)
    assert pending is not None
    shared: dict[str, netmap.DeltaMessage] = {}
    for i in sorted(held):
        if i not in state.peers or not state.shareable(pending, i) or held[i].view != state.view_of(i):
            continue
        msg = decoded(state.shared_delta_message(pending, i))
        first = shared.setdefault(held[i].view, msg)
        assert first == msg, "one view, one delta: it does not depend on which member built it"
        netmap.verify(msg, i, key, held[i])
        netmap.check_order(held[i], msg)
        assert netmap.apply(held[i], msg.delta) == state.full_map(i)
    for view, msg in shared.items():
        for j, m in held.items():
            if m.view == view and j in state.peers and state.shareable(pending, j):
                continue
            try:
                netmap.verify(msg, j, key, m)
            except netmap.NetmapError:
                continue
            # accepted only where it is harmless: j's own delta would say the same (j is in the view)
            assert j in state.peers and netmap.apply(m, msg.delta) == state.full_map(j), (view, j)


def test_without_a_policy_every_node_shares_one_view_and_a_rename_is_signed_once() -> None:
    state = MapState("mesh", (), signing_seed=lambda: bytes(range(32)))
    for i in range(1, 6):
        state.put_peer(peer(i))
        state.record(Change(i, "added", i))
    held = {i: state.full_map(i) for i in state.peers}
    assert len({m.view for m in held.values()}) == 1
    state.put_peer(peer(3, 9))
    state.record(Change(6, "changed", 3))
    pending = state.pending_since(5)
    assert pending is not None
    assert [state.shareable(pending, i) for i in range(1, 6)] == [True, True, False, True, True]
    text = state.shared_delta_message(pending, 1)
    assert all(state.shared_delta_message(pending, i) == text for i in (2, 4, 5))
    for i in (1, 2, 4, 5):
        netmap.verify(decoded(text), i, TRUSTED, held[i])
        assert netmap.apply(held[i], decoded(text).delta) == state.full_map(i)
