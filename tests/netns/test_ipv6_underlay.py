"""IPv6 underlay (issue 15): where IPv4 would stay on the relay, native IPv6 gives a direct path.

The lab's dual-stack routers route 2001:db8::/32 without NAT behind a stateful firewall (new inbound
dropped): only the two sides probing each other at once opens both firewalls, as with a NAT's filter.
"""

from __future__ import annotations

import itertools

import pytest

from tests.eventually import eventually
from tests.netns.lab import Host, Lab
from tests.netns.mesh import Mesh, Node

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _up_all(mesh: Mesh, hosts: list[Host]) -> list[Node]:
    nodes = [mesh.up(h, f"n{i}", wait=False) for i, h in enumerate(hosts)]
    for n in nodes:
        mesh.wait_ready(n)
    return nodes


def _endpoint(mesh: Mesh, a: Node, b: Node) -> str | None:
    peer = mesh.peer(a, b.name)
    return None if peer is None else peer["endpoint"]


def _direct_over_ipv6(mesh: Mesh, nodes: list[Node], *, within: float = 15.0) -> None:
    for a, b in itertools.permutations(nodes, 2):
        took = mesh.wait_path(a, b.name, "direct", within=within)
        print(f"{a.name} -> {b.name}: direct after {took:.2f} s more")
    for a, b in itertools.permutations(nodes, 2):
        peer = mesh.peer(a, b.name)
        assert peer is not None
        assert peer["endpoint"] == f"[{b.host.ip6}]:41641", f"{a.name} -> {b.name}: {peer['endpoint']}"
        mesh.wait_ping(a, b, within=10.0)


def test_edm_pair_with_native_ipv6_goes_direct_over_ipv6(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server(name="coord"))
    a, b = _up_all(mesh, [lab.host(nat="edm", ipv6=True), lab.host(nat="edm", ipv6=True)])
    _direct_over_ipv6(mesh, [a, b])
    me = mesh.status(a)["self"]
    assert f"[{a.host.ip6}]:41641" in me["endpoints"]
    assert me["nat"]["mapping_varies_by_dest"] is True, "IPv4 is still endpoint-dependent"


def test_cgnat_with_native_ipv6_goes_direct_over_ipv6(lab: Lab, mesh: Mesh) -> None:
    """CGNAT and EDM: over IPv4 neither side learns a port that passes the other's NAT (the relay, see
    test_traversal's three-node test); both have IPv6, as many CGNAT users do."""
    mesh.start_coordinator(lab.server(name="coord"))
    a, b = _up_all(mesh, [lab.host(nat="cgnat", ipv6=True), lab.host(nat="edm", ipv6=True)])
    _direct_over_ipv6(mesh, [a, b])


def test_ipv6_only_hosts_reach_an_ipv4_coordinator_through_its_ipv6_address(lab: Lab, mesh: Mesh) -> None:
    """The coordinator's URL names its IPv4 address; it also serves on its IPv6 one (--listen-ipv6), which
    the relay map carries. One node's network drops all outgoing UDP: only the relay (TCP over IPv6)
    joins the two, and STUN over IPv6 answers the other."""
    s = lab.server(name="coord", ipv6=True)
    assert s.ip6 is not None
    mesh.start_coordinator(s, extra=("--listen-ipv6", s.ip6))
    mesh.url = f"http://[{s.ip6}]:8080"  # what IPv6-only nodes enroll with; the map still says IPv4
    a, b = _up_all(mesh, [lab.host(nat="udp-blocked", ipv6="only"), lab.host(nat="eim", ipv6="only")])
    for x, y in itertools.permutations((a, b)):
        mesh.wait_path(x, y.name, "relay", within=15.0)
        mesh.wait_ping(x, y, within=10.0)
    assert f"[{b.host.ip6}]:41641" in mesh.status(b)["self"]["endpoints"]
    assert f"IPv6 address seen by [{s.ip6}]:3478: [{b.host.ip6}]:41641" in b.log.read_text()


def test_eim_pair_with_ipv6_keeps_ipv4_direct(lab: Lab, mesh: Mesh) -> None:
    """Both families go direct here; IPv4 ranks first (the lab measures the same underlay RTT for both:
    0.064 ms vs 0.072 ms ping average), so the path stays where it was before IPv6 candidates existed."""
    mesh.start_coordinator(lab.server(name="coord"))
    ha, hb = lab.host(nat="eim", ipv6=True), lab.host(nat="eim", ipv6=True)
    a, b = _up_all(mesh, [ha, hb])
    for x, y, far in ((a, b, hb), (b, a, ha)):
        mesh.wait_path(x, y.name, "direct", within=15.0)
        want = f"{far.public_ip}:41641"

        def on_ipv4(x: Node = x, y: Node = y, want: str = want) -> bool:
            return _endpoint(mesh, x, y) == want

        eventually(on_ipv4, within=10.0, what=f"{x.name} direct on {want}")
    assert f"[{ha.ip6}]:41641" in mesh.status(a)["self"]["endpoints"]
    mesh.wait_ping(a, b)
