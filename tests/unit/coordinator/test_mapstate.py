"""The server's per-node deltas agree with the pure diff/apply of full maps (coordinator.mapstate)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.mapstate import Change, MapState
from meshd.proto import netmap
from meshd.proto.netmap import Peer, RelayRegion

OBSERVER = 1


def peer(i: int, rev: int = 0) -> Peer:
    tags = ("tag:db",) if rev % 2 else ()
    return Peer(i, f"n{i}-{rev}", (f"100.64.0.{i}/32",), f"wg{i}", f"nk{i}", f"cert{rev}", tags=tags)


POLICIES = [  # none, nothing allowed, n1 -> tagged nodes, odd ids -> anyone (by address), everyone -> n3's
    "",
    "# deny all\n",
    '[tag_owners]\n"tag:db" = []\n[[rules]]\nsrc = ["100.64.0.1"]\ndst = ["tag:db:22"]\n',
    '[hosts]\nodd = "100.64.0.3"\n[[rules]]\nsrc = ["odd", "100.64.0.5/32"]\ndst = ["*:*"]\nproto = "icmp"\n',
    '[[rules]]\nsrc = ["*"]\ndst = ["user:u3:80"]\n',
]


ops = st.lists(
    st.tuples(st.sampled_from(["add", "change", "endpoints", "remove", "policy"]), st.integers(1, 6)),
    max_size=30,
)


@settings(max_examples=200)
@given(before=ops, after=ops)
def test_delta_since_any_version_rebuilds_the_current_map(
    before: list[tuple[str, int]], after: list[tuple[str, int]]
) -> None:
    state = MapState("mesh", (RelayRegion(1, "default", "http://c", 3478),))
    version = 0

    def run(seq: list[tuple[str, int]]) -> None:
        nonlocal version
        for n, (op, i) in enumerate(seq):
            if i == OBSERVER and op == "remove":
                continue
            version += 1
            if op == "policy":
                state.policy = POLICIES[(version + i) % len(POLICIES)]
                state.record(Change(version, "policy", None))
            elif op == "add":
                if i in state.peers:
                    version -= 1
                    continue
                state.owners[i] = f"u{i}"
                state.put_peer(peer(i))
                state.record(Change(version, "added", i))
            elif i not in state.peers:
                version -= 1
            elif op == "change":
                state.put_peer(peer(i, n + 1))
                state.record(Change(version, "changed", i))
            elif op == "endpoints":
                state.set_endpoints(i, (f"6.0.0.{n}:1",), n % 2 == 0)
                state.record(Change(version, "endpoints", i))
            else:
                state.drop_peer(i)
                state.record(Change(version, "removed", i))

    version += 1
    state.put_peer(peer(OBSERVER))
    state.record(Change(version, "added", OBSERVER))
    run(before)
    seen = state.full_map(OBSERVER)
    run(after)
    pending = state.pending_since(seen.version)
    assert pending is not None
    rebuilt = netmap.apply(seen, state.delta_for(pending, OBSERVER))
    assert rebuilt == state.full_map(OBSERVER)
    text = state.full_map_message(OBSERVER)
    assert netmap.decode_server_message(text) == netmap.MapMessage(state.full_map(OBSERVER))
    assert replace(rebuilt) == rebuilt


def test_a_version_older_than_the_log_or_a_restart_needs_a_full_map() -> None:
    state = MapState("mesh", (), log_keep=2)
    for v in range(1, 5):
        state.put_peer(peer(v))
        state.record(Change(v, "added", v))
    assert state.pending_since(1) is None
    assert state.pending_since(2) is not None
    state.record(Change(5, "restart", None))
    assert state.pending_since(4) is None and state.pending_since(5) is not None
