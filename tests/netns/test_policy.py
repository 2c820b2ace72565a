"""Access policy end to end in the lab: real coordinator, real meshd, real wireguard-go, real nftables.

Policy a->b:22/tcp only: ssh a->b works, ping does not, b cannot reach a; widened, ping works within 1 s;
narrowed again, it stops within 1 s. A node with no permission does not see the others at all. A bad
policy is refused with line numbers and the old one stays.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meshd import firewall
from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh, Node

pytestmark = pytest.mark.netns

SSH_ONLY = """\
# a may ssh to b; nothing else
[[rules]]
src = ["node:a"]
dst = ["node:b:22"]
proto = "tcp"

[[tests]]
src = "node:a"
accept = ["node:b:22"]
deny = ["node:c:22"]
"""

WITH_PING = (
    SSH_ONLY
    + """
[[rules]]
src = ["node:a"]
dst = ["node:b:*"]
proto = "icmp"
"""
)


def set_policy(mesh: Mesh, text: str, name: str = "policy.toml") -> None:
    path = mesh.dir / name
    path.write_text(text)
    mesh.admin("policy", "set", str(path))


def quick_ping(mesh: Mesh, src: Node, dst_ip: str) -> bool:
    r = src.host.run(["ping", "-n", "-c", "1", "-W", "0.2", dst_ip], timeout=5)
    return r.returncode == 0


def ping_becomes(mesh: Mesh, src: Node, dst_ip: str, ok: bool, within: float) -> float:
    """Seconds until a single ping from `src` succeeds (ok) / fails (not ok); fails after `within` s."""
    t0 = time.monotonic()
    eventually(
        lambda: quick_ping(mesh, src, dst_ip) == ok,
        within=within,
        interval=0.01,
        what=f"ping {src.name} -> {dst_ip} {'passes' if ok else 'fails'}",
    )
    return time.monotonic() - t0


def ssh_ok(mesh: Mesh, src: Node, target: str, key: Path) -> bool:
    return mesh.ssh(src, target, "true", key).returncode == 0


def test_policy_is_enforced_on_every_host_and_changes_apply_within_one_second(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server())
    a, b, c = (mesh.up(lab.host(nat="public"), n) for n in "abc")
    for n, others in ((a, "bc"), (b, "ac"), (c, "ab")):
        for o in others:
            mesh.wait_peer(n, o)
    ip_a, ip_b = mesh.overlay_ip(a), mesh.overlay_ip(b)
    mesh.wait_ping(a, b)
    key_b, key_a = mesh.start_sshd(b.host), mesh.start_sshd(a.host)
    assert ssh_ok(mesh, b, "a.mesh", key_a)  # no policy: everything allowed

    set_policy(mesh, SSH_ONLY)
    # layer 1: c may talk to nobody, so nobody appears in its status, and it is gone from a's and b's
    mesh.wait_peer(c, "a", present=False, within=1.0)
    mesh.wait_peer(c, "b", present=False, within=1.0)
    mesh.wait_peer(a, "c", present=False, within=1.0)
    assert mesh.status(c)["peers"] == []
    assert [p["name"] for p in mesh.status(a)["peers"]] == ["b"]
    # layer 2: ssh a -> b passes, ping does not, b cannot open anything to a (replies still pass)
    ping_becomes(mesh, a, ip_b, ok=False, within=1.0)
    assert ssh_ok(mesh, a, "b.mesh", key_b)
    assert not quick_ping(mesh, b, ip_a)
    assert not ssh_ok(mesh, b, "a.mesh", key_a)
    table = b.host.run(["nft", "list", "table", "inet", firewall.table_name(b.interface)])
    assert table.returncode == 0 and "tcp dport 22 accept" in table.stdout

    set_policy(mesh, WITH_PING, "wider.toml")
    assert ping_becomes(mesh, a, ip_b, ok=True, within=1.0) < 1.0
    assert not quick_ping(mesh, b, ip_a)  # one direction only

    set_policy(mesh, SSH_ONLY, "narrower.toml")
    assert ping_becomes(mesh, a, ip_b, ok=False, within=1.0) < 1.0
    assert ssh_ok(mesh, a, "b.mesh", key_b)

    # a malformed policy and one whose tests fail are refused, line numbers given; the old one stays
    bad = mesh.dir / "bad.toml"
    bad.write_text('[[rules]]\nsrc = ["node:a"\ndst = ["node:b:22"]\n')
    r = mesh.admin("policy", "set", str(bad), check=False)
    assert (
        r.returncode != 0 and "line 3, column 1: Unclosed array" in r.stderr and "Traceback" not in r.stderr
    )
    bad.write_text(SSH_ONLY.replace('deny = ["node:c:22"]', 'deny = ["node:b:22"]'))
    r = mesh.admin("policy", "set", str(bad), check=False)
    assert r.returncode != 0, r.stderr
    assert "line 10: test failed: node:a may reach node:b:22 (tcp)" in r.stderr, r.stderr
    assert mesh.admin("policy", "get").stdout == SSH_ONLY

    # no policy again: the tables go away and everyone sees everyone
    empty = mesh.dir / "empty.toml"
    empty.write_text("")
    mesh.admin("policy", "set", str(empty))
    assert mesh.admin("policy", "get").stdout.strip() == "no policy set: everything is allowed"
    mesh.wait_peer(c, "a", within=2.0)
    ping_becomes(mesh, b, ip_a, ok=True, within=5.0)
    gone = b.host.run(["nft", "list", "table", "inet", firewall.table_name(b.interface)])
    assert gone.returncode != 0
