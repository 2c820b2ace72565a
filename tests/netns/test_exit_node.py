"""Exit nodes end to end (issue 17): real coordinator, meshd, wireguard-go, policy routing, NAT routers.

A lab "internet" host accepts TCP only from the exit node's public address. A client behind a NAT gets
through once it switches to the exit node at run time (``meshd set --exit-node``), and the host sees the
exit node's address; the mesh and the control plane keep working; ``--exit-node none`` restores the
routing rules and tables exactly; with the exit node dead the client still talks to the coordinator.
"""

from __future__ import annotations

import signal

import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh, Node

pytestmark = [pytest.mark.netns, pytest.mark.slow]

NO_DNS = ("--dns", "off")  # the resolver's address would be the mesh interface's first (source) address
PORT = 4100


def routing_state(node: Node) -> str:
    r = node.host.run(
        ["sh", "-c", "ip rule; ip -6 rule; ip route show table all; ip -6 route show table all"]
    )
    return r.stdout


def ask(node: Node, ip: str) -> str | None:
    r = node.host.echo("ask-tcp", f"{ip}:{PORT}", "--timeout", "1")
    return r.stdout.strip() if r.returncode == 0 else None


def test_internet_through_the_exit_node_and_back(lab: Lab, mesh: Mesh) -> None:
    coord = lab.server()
    mesh.start_coordinator(coord)
    internet = lab.server()
    exit_ = mesh.up(lab.host(nat="public"), "exit", extra=(*NO_DNS, "--advertise-exit-node"))
    client = mesh.up(lab.host(nat="eim"), "client", extra=NO_DNS)
    internet.start_echo(udp=None, tcp=PORT)
    internet.run(
        ["nft", "-f", "-"],
        input=(
            "table inet only_exit {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
            f"  tcp dport {PORT} ip saddr != {exit_.host.ip} drop\n }}\n}}\n"
        ),
        check=True,
    )
    mesh.wait_peer(client, "exit")
    assert ask(client, internet.ip) is None  # from the client's own public address: refused
    before = routing_state(client)

    r = mesh.meshd(client, "set", "--exit-node", "exit", check=False)
    assert r.returncode != 0 and "no exit node named 'exit'" in r.stderr  # advertised, not approved yet
    mesh.admin("routes", "approve", "exit", "exit")
    eventually(lambda: "0.0.0.0/0" in (mesh.peer(client, "exit") or {}).get("routes", []), within=5)
    assert mesh.meshd(client, "set", "--exit-node", "exit").stdout.strip() == "exit node: exit"
    seen = eventually(lambda: ask(client, internet.ip), within=5, what="internet host reached via the exit")
    assert seen.split(":")[0] == exit_.host.ip
    assert mesh.status(client)["self"]["exit_node"] == "exit"
    assert mesh.status(exit_)["self"]["routes"]["approved"] == ["0.0.0.0/0", "::/0"]
    # the mesh and the control plane stay on their paths
    mesh.wait_ping(client, exit_)
    assert mesh.status(client)["coordinator"]["connected"]
    rules = client.host.run(["ip", "-6", "route", "show", "table", "51820"]).stdout
    assert "default" in rules  # IPv6 goes through the exit node too (it carries ::/0)

    assert mesh.meshd(client, "set", "--exit-node", "none").stdout.strip() == "exit node: none"
    assert routing_state(client) == before  # restored exactly
    assert ask(client, internet.ip) is None

    # a dead exit node: the client's control plane does not depend on it
    mesh.meshd(client, "set", "--exit-node", "exit")
    eventually(lambda: ask(client, internet.ip), within=5, what="internet via the exit again")
    mesh.stop(exit_, sig=signal.SIGKILL)
    assert ask(client, internet.ip) is None
    health = f"import urllib.request as u; print(u.urlopen('{mesh.url}/healthz', timeout=2).status)"
    assert client.host.python(health).strip() == "200"
    eventually(lambda: mesh.status(client)["coordinator"]["connected"], within=5)
