"""Hostile: a node cannot get a user's grants by choosing its hostname (issue 12, "Identity").

Real coordinator, real meshd, real wireguard-go and nftables in the lab. The policy lets user alice reach
user bob. Mallory, who holds a pre-auth key of her own, enrolls a machine with ``--hostname alice``: it
must not see bob in its map nor reach him over the mesh, while alice's real node does. Before issue 12 a
rule for ``alice`` matched user alice's nodes *and any node named alice*, so mallory's node got both.
"""

from __future__ import annotations

import time

import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh, Node

pytestmark = [pytest.mark.netns, pytest.mark.hostile]

ALICE_TO_BOB = """\
# alice may reach bob (ping included); nobody else may reach anyone
[[rules]]
src = ["user:alice"]
dst = ["user:bob:*"]

[[tests]]
src = "user:alice"
accept = ["user:bob:22"]
"""


def set_policy(mesh: Mesh, text: str, name: str) -> None:
    path = mesh.dir / name
    path.write_text(text)
    mesh.admin("policy", "set", str(path))


def quick_ping(src: Node, dst_ip: str) -> bool:
    return src.host.run(["ping", "-n", "-c", "1", "-W", "0.3", dst_ip], timeout=5).returncode == 0


def test_identity_a_node_named_like_a_user_gets_none_of_her_grants(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server())
    bob = mesh.up(lab.host(nat="public"), "bob-pc", key=mesh.new_key("bob"))
    alice = mesh.up(lab.host(nat="public"), "alice-laptop", key=mesh.new_key("alice"))
    set_policy(mesh, ALICE_TO_BOB, "alice-to-bob.toml")
    ip_bob = mesh.overlay_ip(bob)
    # positive control: the policy works for alice's real node
    mesh.wait_peer(alice, "bob-pc")
    mesh.wait_ping(alice, ip_bob)

    # the attack: mallory's own machine, enrolled with her own key, calls itself "alice"
    mallory = mesh.up(lab.host(nat="public"), "alice", key=mesh.new_key("mallory"))
    eventually(lambda: mesh.status(mallory)["coordinator"]["connected"], within=10, what="mallory has a map")
    me = mesh.status(mallory)["self"]["name"]
    assert me != "alice", "a node was enrolled under a user's name"  # renamed with a suffix (alice-1)

    # for 3 s (maps arrive within 1 s): mallory sees nobody and reaches bob on no port, bob never sees her
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert mesh.status(mallory)["peers"] == [], "mallory's node got a peer it may not talk to"
        assert mesh.peer(bob, me) is None, "bob's node lists mallory's node"
        assert not quick_ping(mallory, ip_bob), "mallory's node reached bob over the mesh"
    assert quick_ping(alice, ip_bob)  # alice's node is unaffected

    # second positive control: mallory's node is a working node, it is only the policy that keeps it out
    set_policy(mesh, ALICE_TO_BOB + f'\n[[rules]]\nsrc = ["node:{me}"]\ndst = ["user:bob:*"]\n', "wider.toml")
    mesh.wait_peer(mallory, "bob-pc", within=5)
    mesh.wait_ping(mallory, ip_bob)
