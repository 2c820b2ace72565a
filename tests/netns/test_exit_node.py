"""Exit nodes end to end (issue 17): real coordinator, meshd, wireguard-go, policy routing, NAT routers.

A lab "internet" host accepts TCP only from the exit node's public address. A client behind a NAT gets
through once it switches to the exit node at run time (``meshd set --exit-node``), and the host sees the
exit node's address; the mesh, the control plane and the client's own LAN keep their paths;
``--exit-node none`` restores the routing rules and tables exactly; with the exit node dead the client
still talks to the coordinator. A second, dual-stack lab starts its client with ``meshd up --exit-node``:
IPv4 and IPv6 leave through the exit node, and with only 0.0.0.0/0 approved the client's IPv6 to the
internet is blocked rather than leaked through its own uplink. Every node runs the default ``--dns
auto`` (the resolver's address is scope host on the mesh interface, never a source address: baabd50).
"""

from __future__ import annotations

import signal

import pytest

from tests.eventually import eventually
from tests.netns.lab import Host, Lab
from tests.netns.mesh import Mesh, Node

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 4100


def routing_state(node: Node) -> str:
    r = node.host.run(
        ["sh", "-c", "ip rule; ip -6 rule; ip route show table all; ip -6 route show table all"]
    )
    return r.stdout


def ask(host: Host, ip: str) -> str | None:
    """The source address the echo server at ``ip`` saw for a TCP connection from ``host`` (None: none)."""
    r = host.echo("ask-tcp", f"{ip}:{PORT}", "--timeout", "1")
    return r.stdout.strip().rsplit(":", 1)[0] if r.returncode == 0 else None


def test_internet_through_the_exit_node_and_back(lab: Lab, mesh: Mesh) -> None:
    coord = lab.server()
    mesh.start_coordinator(coord)
    internet = lab.server()
    exit_ = mesh.up(lab.host(nat="public"), "exit", extra=("--advertise-exit-node",))
    client = mesh.up(lab.host(nat="eim"), "client")
    assert client.host.router is not None
    neighbour = lab.host(router=client.host.router)  # on the client's LAN, no meshd
    internet.start_echo(udp=None, tcp=PORT)
    coord.start_echo(udp=None, tcp=PORT)  # on the coordinator's address: what its path looks like
    neighbour.start_echo(udp=None, tcp=PORT)
    internet.run(
        ["nft", "-f", "-"],
        input=(
            "table inet only_exit {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
            f"  tcp dport {PORT} ip saddr != {exit_.host.ip} drop\n }}\n}}\n"
        ),
        check=True,
    )
    mesh.wait_peer(client, "exit")
    assert ask(client.host, internet.ip) is None  # from the client's own public address: refused
    before = routing_state(client)

    r = mesh.meshd(client, "set", "--exit-node", "exit", check=False)
    assert r.returncode != 0 and "no exit node named 'exit'" in r.stderr  # advertised, not approved yet
    mesh.admin("routes", "approve", "exit", "exit")
    eventually(lambda: "0.0.0.0/0" in (mesh.peer(client, "exit") or {}).get("routes", []), within=5)
    assert mesh.meshd(client, "set", "--exit-node", "exit").stdout.strip() == "exit node: exit"
    seen = eventually(lambda: ask(client.host, internet.ip), within=5, what="internet host via the exit")
    assert seen == exit_.host.ip
    assert mesh.status(client)["self"]["exit_node"] == "exit"
    assert mesh.status(exit_)["self"]["routes"]["approved"] == ["0.0.0.0/0", "::/0"]
    # the mesh, the control plane and the LAN stay on their paths: the coordinator's address and the LAN
    # neighbour see the client's own addresses (through the exit node: the exit's, or nothing at all)
    mesh.wait_ping(client, exit_)
    assert mesh.status(client)["coordinator"]["connected"]
    assert ask(client.host, coord.ip) == client.host.public_ip
    assert ask(client.host, neighbour.ip) == client.host.ip
    rules = client.host.run(["ip", "-6", "route", "show", "table", "51820"]).stdout
    assert "default" in rules  # IPv6 goes through the exit node too (it carries ::/0)

    assert mesh.meshd(client, "set", "--exit-node", "none").stdout.strip() == "exit node: none"
    assert routing_state(client) == before  # restored exactly
    assert ask(client.host, internet.ip) is None

    # a dead exit node: the client's control plane does not depend on it
    mesh.meshd(client, "set", "--exit-node", "exit")
    eventually(lambda: ask(client.host, internet.ip), within=5, what="internet via the exit again")
    mesh.stop(exit_, sig=signal.SIGKILL)
    assert ask(client.host, internet.ip) is None
    health = f"import urllib.request as u; print(u.urlopen('{mesh.url}/healthz', timeout=2).status)"
    assert client.host.python(health).strip() == "200"
    eventually(lambda: mesh.status(client)["coordinator"]["connected"], within=5)


def test_exit_node_chosen_at_start_carries_ipv6_or_blocks_it(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server())
    internet = lab.server(ipv6=True)
    internet.start_echo(udp=None, tcp=PORT, tcp6=PORT)  # no filter: a leak would show the client's own
    exit_ = mesh.up(lab.host(nat="public", ipv6=True), "exit", extra=("--advertise-exit-node",))
    assert internet.ip6 is not None and exit_.host.ip6 is not None
    mesh.admin("routes", "approve", "exit", "exit")
    home = lab.host(nat="eim", ipv6=True)
    assert ask(home, internet.ip6) == home.ip6  # the control: without the exit, IPv6 leaves directly

    client = mesh.up(home, "client", extra=("--exit-node", "exit"))
    assert mesh.status(client)["self"]["exit_node"] == "exit"
    eventually(lambda: ask(home, internet.ip) == exit_.host.ip, within=10, what="IPv4 via the exit")
    assert ask(home, internet.ip6) == exit_.host.ip6  # and IPv6, masqueraded to the exit's address

    # only 0.0.0.0/0 approved: IPv4 still through the exit, IPv6 to the internet refused, not leaked
    mesh.admin("routes", "remove", "exit", "::/0")
    eventually(lambda: mesh.peer(client, "exit")["routes"] == ["0.0.0.0/0"], within=5)  # type: ignore[index]
    # a leak would answer with the client's own address every time: this never turns None then
    eventually(lambda: ask(home, internet.ip6) is None, within=5, what="IPv6 to the internet blocked")
    assert "unreachable" in home.run(["ip", "-6", "route", "show", "table", "51820"]).stdout
    assert ask(home, internet.ip6) is None
    assert ask(home, internet.ip) == exit_.host.ip
    assert mesh.status(client)["self"]["exit_node"] == "exit"
