"""The relay end to end in the lab: real coordinator with its embedded relay, real meshd, real wireguard-go,
real NAT. Where no direct path can exist (both behind endpoint-dependent NAT, or UDP blocked) traffic flows
over the relay; removal drops a node's relay session at once; a restarted relay is back within 5 s."""

from __future__ import annotations

import time

import pytest

from coordinator.adminclient import AdminClient
from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh, Node

pytestmark = pytest.mark.netns


def _path(mesh: Mesh, node: Node, peer: str) -> str | None:
    p = mesh.peer(node, peer)
    return p["path"] if p else None


def _relayed_pair(lab: Lab, mesh: Mesh, nat_a: str, nat_b: str) -> tuple[Node, Node]:
    mesh.start_coordinator(lab.server())
    a = mesh.up(lab.host(nat=nat_a), "alpha")
    b = mesh.up(lab.host(nat=nat_b), "beta")
    mesh.wait_peer(a, "beta")
    mesh.wait_peer(b, "alpha")
    return a, b


def _ping_and_ssh_by_name(mesh: Mesh, a: Node, b: Node) -> None:
    mesh.wait_ping(a, b, within=10)
    mesh.wait_ping(b, a, within=10)
    key = mesh.start_sshd(b.host)
    r = mesh.ssh(a, "beta.mesh", "ip netns identify", key)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b.host.ns


def test_both_behind_endpoint_dependent_nat_talk_over_the_relay(lab: Lab, mesh: Mesh) -> None:
    a, b = _relayed_pair(lab, mesh, "edm", "edm")
    _ping_and_ssh_by_name(mesh, a, b)
    doc = mesh.status(a)
    assert doc["self"]["relay"] == "default"
    [peer] = doc["peers"]
    assert peer["path"] == "relay" and peer["relay"] == "default"
    assert peer["endpoint"] is None and peer["rx_bytes"] > 0


def test_host_behind_udp_blocking_firewall_talks_over_the_relay(lab: Lab, mesh: Mesh) -> None:
    a, b = _relayed_pair(lab, mesh, "udp-blocked", "eim")
    _ping_and_ssh_by_name(mesh, a, b)
    assert _path(mesh, a, "beta") == "relay"


def test_relay_restarted_connectivity_back_within_5s(lab: Lab, mesh: Mesh) -> None:
    a, b = _relayed_pair(lab, mesh, "edm", "edm")
    mesh.wait_ping(a, b, within=10)
    mesh.stop_coordinator()
    t0 = time.monotonic()
    mesh.start_coordinator(mesh.coord_host)
    elapsed = mesh.wait_ping(a, b, within=10)
    total = time.monotonic() - t0
    print(f"relay back: ping answered {total:.2f} s after the restart began ({elapsed:.2f} s after healthy)")
    assert elapsed < 5.0, f"connectivity back after {elapsed:.2f} s"


def test_removed_node_loses_its_relay_session_within_1s(lab: Lab, mesh: Mesh) -> None:
    a, b = _relayed_pair(lab, mesh, "edm", "edm")
    mesh.wait_ping(a, b, within=10)
    beta_ip = mesh.overlay_ip(b)
    # the admin API in-process, not the `coordinator` CLI: the clock must time the relay, not the start-up
    # of a Python process (close to a second on a loaded machine)
    with AdminClient(mesh.coord_dir / "admin.sock") as admin:
        t0 = time.monotonic()
        admin.call("DELETE", "/admin/nodes/beta")
    eventually(
        lambda: "relay session close: node 2" in mesh.coordinator_log(200),
        within=3,
        what="the coordinator logged the end of beta's relay session",
    )
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"relay dropped the removed node after {elapsed:.2f} s"
    assert not mesh.ping(a, beta_ip, wait=1.0)
