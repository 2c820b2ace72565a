"""UDP relay ports end to end (issue 14): real coordinator with its embedded relay, real meshd, real
wireguard-go, real endpoint-dependent NAT. A pair that cannot go direct starts on the TCP relay and moves
to its UDP relay ports (WireGuard's endpoint becomes relay:port, no meshd on the data path); NAT
rebinding heals; a relay restart comes back within 5 s; the kernel fast path leaves nothing behind."""

from __future__ import annotations

import json
import time

import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import COORD_PORT, Mesh, Node

pytestmark = pytest.mark.netns


#: names come from the hosts block: these tests are about the relay, not the resolver
MESHD = ("--dns", "hosts")


def _relayed_pair(lab: Lab, mesh: Mesh) -> tuple[Node, Node]:
    mesh.start_coordinator(lab.server())
    a = mesh.up(lab.host(nat="edm"), "alpha", extra=MESHD)
    b = mesh.up(lab.host(nat="edm"), "beta", extra=MESHD)
    mesh.wait_peer(a, "beta")
    mesh.wait_peer(b, "alpha")
    return a, b


def _transport(mesh: Mesh, node: Node, peer: str) -> tuple[str | None, str | None]:
    p = mesh.peer(node, peer)
    return (p["path"], p.get("relay_transport")) if p else (None, None)


def _wg_endpoint(node: Node) -> str:
    """The WireGuard endpoint of the node's only peer, as wireguard-go has it."""
    out = node.host.run(["wg", "show", node.interface, "endpoints"], check=True).stdout.split()
    return out[1] if len(out) >= 2 else ""


def _wait_udp(mesh: Mesh, a: Node, b: Node, within: float = 10.0) -> None:
    for node, peer in ((a, "beta"), (b, "alpha")):
        eventually(
            lambda n=node, p=peer: _transport(mesh, n, p) == ("relay", "udp"),
            within=within,
            what=f"{node.name} on the UDP relay port",
        )


@pytest.mark.parametrize("forwarding", ["userspace", "kernel"])
def test_edm_pair_goes_over_udp_relay_ports(
    lab: Lab, mesh: Mesh, monkeypatch: pytest.MonkeyPatch, forwarding: str
) -> None:
    if forwarding == "userspace":
        monkeypatch.setenv("MESHRELAY_USERSPACE", "1")
    a, b = _relayed_pair(lab, mesh)
    mesh.wait_ping(a, b, within=10)
    _wait_udp(mesh, a, b)
    relay_ip = mesh.coord_host.ip
    assert _wg_endpoint(a).startswith(f"{relay_ip}:") and not _wg_endpoint(a).endswith(f":{COORD_PORT}")
    mesh.wait_ping(a, b, within=5)
    key = mesh.start_sshd(b.host)
    r = mesh.ssh(a, "beta.mesh", "ip netns identify", key)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b.host.ns
    log = mesh.coordinator_log(400)
    assert "relay ports" in log
    assert ("kernel forwarding" in log) == (forwarding == "kernel") or forwarding == "userspace"
    if forwarding == "kernel":
        rules = mesh.coord_host.run(["nft", "list", "table", "ip", "meshrelay1"], check=True).stdout
        assert "dnat to" in rules and "masquerade" in rules
        # the kernel carried the ping and ssh: the rule counters moved
        counters = json.loads(
            mesh.coord_host.run(["nft", "-j", "list", "chain", "ip", "meshrelay1", "relayfwd"]).stdout
        )
        bytes_ = [
            e["counter"]["bytes"]
            for i in counters["nftables"]
            if "rule" in i
            for e in i["rule"]["expr"]
            if "counter" in e
        ]
        assert sum(bytes_) > 0


def test_relay_restart_with_udp_ports_back_within_5s_and_nothing_left(lab: Lab, mesh: Mesh) -> None:
    a, b = _relayed_pair(lab, mesh)
    _wait_udp(mesh, a, b)
    mesh.wait_ping(a, b, within=5)
    mesh.stop_coordinator()
    # the stopped relay left no rules and no conntrack entries of its own
    tables = mesh.coord_host.run(["nft", "list", "tables"]).stdout
    assert "meshrelay1" not in tables
    flows = mesh.coord_host.run(["conntrack", "-L", "--mark", str(0x4D520001)]).stdout
    assert flows.strip() == ""
    mesh.start_coordinator(mesh.coord_host)
    elapsed = mesh.wait_ping(a, b, within=10)
    print(f"relay back: ping answered {elapsed:.2f} s after the restarted relay was healthy")
    assert elapsed < 5.0
    _wait_udp(mesh, a, b, within=15)
    mesh.wait_ping(a, b, within=5)


def test_nat_rebinding_heals_within_seconds(lab: Lab, mesh: Mesh) -> None:
    a, b = _relayed_pair(lab, mesh)
    _wait_udp(mesh, a, b)
    mesh.wait_ping(a, b, within=5)
    router = a.host.router
    assert router is not None
    # a router reboot: every mapping forgotten, new ones get new ports
    router.run(["conntrack", "-F"])
    t0 = time.monotonic()
    mesh.wait_ping(a, b, within=15)
    healed = time.monotonic() - t0
    print(f"NAT rebinding healed in {healed:.2f} s")
    assert healed < 8.0
    assert _transport(mesh, a, "beta") == ("relay", "udp")


def test_udp_blocked_host_stays_on_the_tcp_relay(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server())
    a = mesh.up(lab.host(nat="udp-blocked"), "alpha", extra=MESHD)
    b = mesh.up(lab.host(nat="eim"), "beta", extra=MESHD)
    mesh.wait_peer(a, "beta")
    mesh.wait_ping(a, b, within=10)
    # its binds never reach the relay, so the pair is never ready: the TCP relay carries it
    assert _transport(mesh, a, "beta") == ("relay", "tcp")
    assert _transport(mesh, b, "alpha") == ("relay", "tcp")
    mesh.wait_ping(a, b, within=5)
