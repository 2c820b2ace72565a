"""Hostile: the host firewall covers every path into a node and fails closed (issue 13).

1. b publishes a "container" the way ``docker run -p 8080:80`` does: a DNAT from port 8080 of every
   address to 172.31.0.2:80 in a namespace behind a veth, so the packets take the ``forward`` path. The
   policy lets a reach b:8080 and c only b:22. c dials b's mesh address port 8080: it must not connect
   (it did while meshd's chain hooked ``input`` only); a, the positive control, must.
2. d runs with an ``nft`` that fails (first on its PATH). Before any policy nothing needs nft and d sees
   its peers (the control: d works); once a policy gives d inbound rules, d cannot install them and must
   configure no peer at all (status and ``wg`` agree) and say why in ``self.firewall_error``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh, Node

pytestmark = [pytest.mark.netns, pytest.mark.hostile]

PUBLISHED = """\
[[rules]]
src = ["node:a"]
dst = ["node:b:8080"]
proto = "tcp"

[[rules]]
src = ["node:c"]
dst = ["node:b:22"]
proto = "tcp"
"""

A_TO_D = """\
[[rules]]
src = ["node:a"]
dst = ["node:d:22"]
proto = "tcp"
"""

SERVE = """\
import socket
srv = socket.create_server(("172.31.0.2", 80))
while True:
    conn, _ = srv.accept()
    with conn:
        conn.sendall(b"CONTAINER\\n")
"""

CONNECT = """\
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        print(s.recv(64).decode(errors="replace"))
except OSError as e:
    print("refused:", e)
    sys.exit(1)
"""


def set_policy(mesh: Mesh, text: str, name: str) -> None:
    path = mesh.dir / name
    path.write_text(text)
    mesh.admin("policy", "set", str(path))


def connects(src: Node, ip: str, port: int, timeout: float = 1.0) -> bool:
    r = src.host.run(["python3", "-c", CONNECT, ip, str(port), str(timeout)], timeout=timeout + 10)
    return r.returncode == 0 and "CONTAINER" in r.stdout


def publish_container_port(lab: Lab, node: Node) -> None:
    """What ``docker run -p 8080:80`` sets up: a bridge-side address, a DNAT at prerouting, forwarding."""
    ctr = lab._namespace("ctr")  # registered with the lab: deleted with it, processes included
    node.host.netns.sh(
        f"ip link add vpub0 type veth peer name vctr0 netns {ctr.name}\n"
        "ip addr add 172.31.0.1/24 dev vpub0\n"
        "ip link set vpub0 up\n"
        "sysctl -qw net.ipv4.ip_forward=1\n"
        "nft -f - <<'EOF'\n"
        "table ip dockerish {\n"
        "\tchain prerouting {\n"
        "\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
        "\t\ttcp dport 8080 dnat to 172.31.0.2:80\n"
        "\t}\n"
        "}\n"
        "EOF\n"
    )
    ctr.sh("ip addr add 172.31.0.2/24 dev vctr0\nip link set vctr0 up\nip route add default via 172.31.0.1\n")
    ctr.popen(["python3", "-c", SERVE])
    eventually(
        lambda: ctr.run(["python3", "-c", CONNECT, "172.31.0.2", "80", "1"]).returncode == 0,
        within=10,
        what="the container's web server answers",
    )


def test_a_port_published_through_dnat_is_reachable_only_as_the_policy_allows(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server())
    a, b, c = (mesh.up(lab.host(nat="public"), n) for n in "abc")
    for n in (a, c):
        mesh.wait_peer(n, "b")
    publish_container_port(lab, b)
    ip_b = mesh.overlay_ip(b)
    mesh.wait_ping(a, b)
    # no policy yet: the published port is open to every peer (the DNAT and forwarding work)
    eventually(lambda: connects(c, ip_b, 8080), within=10, what="c reaches b:8080 with no policy")

    set_policy(mesh, PUBLISHED, "published.toml")
    # a may reach b:8080 (the address and port it dialled, before the DNAT): the positive control
    eventually(lambda: connects(a, ip_b, 8080), within=5, what="a reaches b:8080 under the policy")
    # c sees b (it may reach b:22) but must not reach the container behind b's port 8080
    assert mesh.peer(c, "b") is not None
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert not connects(c, ip_b, 8080, timeout=0.5), "c reached b's DNAT-published port 8080"
    assert connects(a, ip_b, 8080)


def test_when_nft_fails_no_peer_is_configured_and_status_says_why(
    lab: Lab, mesh: Mesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mesh.start_coordinator(lab.server())
    a = mesh.up(lab.host(nat="public"), "a")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nft").write_text("#!/bin/sh\necho 'Error: nft refuses (test)' >&2\nexit 1\n")
    (fake / "nft").chmod(0o755)
    with monkeypatch.context() as m:  # d's meshd inherits this PATH: its nft always fails
        m.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
        d = mesh.up(lab.host(nat="public"), "d")
    mesh.wait_peer(d, "a")  # control: without a policy d needs no nft and works
    mesh.wait_ping(a, d)

    set_policy(mesh, A_TO_D, "a-to-d.toml")
    mesh.wait_peer(d, "a", present=False, within=5.0)
    status = mesh.status(d)
    assert status["peers"] == []
    assert "nft refuses" in (status["self"]["firewall_error"] or ""), status["self"]
    wg_peers = d.host.run(["wg", "show", d.interface, "peers"], check=True).stdout
    assert wg_peers.strip() == "", wg_peers
    assert "configuring no peers" in d.log.read_text(errors="replace")
    # a (real nft) still has d: the failure stays on the node that could not enforce its rules
    assert mesh.peer(a, "d") is not None
    assert not mesh.ping(a, d, wait=1.0)
