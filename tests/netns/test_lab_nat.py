"""Each router kind of the lab behaves as labelled: mapping, filtering, UDP blocking, CGNAT, LANs."""

from __future__ import annotations

from functools import partial

import pytest

from tests.netns.lab import ECHO_PORT, Host, Lab

pytestmark = pytest.mark.netns

PORT = 41641


def observed(host: Host, *servers: Host, port: int = PORT) -> list[str]:
    """The source ip:port each echo server saw for datagrams sent from local ``port`` to it."""
    out = host.echo("ask", "--port", str(port), *(f"{s.ip}:{ECHO_PORT}" for s in servers), check=True)
    return out.stdout.split()


@pytest.fixture
def servers(lab: Lab) -> tuple[Host, Host]:
    s1, s2 = lab.server(), lab.server()
    s1.start_echo(tcp=ECHO_PORT)
    s2.start_echo(tcp=ECHO_PORT)
    return s1, s2


@pytest.mark.parametrize("kind", ["eim", "eim-nofw", "upnp", "cgnat"])
def test_endpoint_independent_kinds_keep_one_mapping_for_two_servers(lab, servers, kind):
    a = lab.host(nat=kind)
    first, second = observed(a, *servers)
    assert first == second == f"{a.public_ip}:{PORT}"


def test_edm_maps_each_server_to_a_different_port(lab, servers):
    a = lab.host(nat="edm")
    first, second = observed(a, *servers)
    assert first.split(":")[0] == second.split(":")[0] == a.router.wan_ip
    assert first != second


def test_public_host_is_seen_with_its_own_address(lab, servers):
    a = lab.host(nat="public")
    assert observed(a, *servers) == [f"{a.ip}:{PORT}"] * 2
    assert a.router is None


@pytest.mark.parametrize("kind", ["eim", "eim-nofw", "edm", "upnp", "udp-blocked", "cgnat"])
def test_unsolicited_inbound_never_reaches_the_host(lab, servers, kind):
    a = lab.host(nat=kind)
    s1, _ = servers
    send = partial(s1.send_udp, f"{a.public_ip}:{PORT}", "unsolicited", port=ECHO_PORT)
    assert a.first_arrival(PORT, send) is None


@pytest.mark.parametrize("kind", ["eim", "edm", "upnp", "cgnat"])
def test_reply_from_the_contacted_server_gets_in_but_not_from_another(lab, servers, kind):
    a = lab.host(nat=kind)
    s1, s2 = servers
    listener = a.listen_udp(PORT, timeout=5.0, punch=f"{s1.ip}:{ECHO_PORT}")
    mapped = listener.mapped
    assert mapped is not None and mapped.split(":")[0] == a.public_ip
    s1.send_udp(mapped, "reply", port=ECHO_PORT)
    assert listener.result() == f"{s1.ip}:{ECHO_PORT} reply"

    # Same mapping, a server the host never contacted: filtered (address and port dependent filtering).
    send = partial(s2.send_udp, mapped, "stranger", port=ECHO_PORT)
    assert a.first_arrival(PORT, send) is None
    # ...while the contacted server still gets through the same mapping.
    send = partial(s1.send_udp, mapped, "again", port=ECHO_PORT)
    assert a.first_arrival(PORT, send) == f"{s1.ip}:{ECHO_PORT} again"


@pytest.mark.parametrize(("kind", "moves"), [("eim", False), ("eim-nofw", True)])
def test_early_peer_packet_moves_the_mapping_only_without_the_input_drop(lab, servers, kind, moves):
    """The peer's punch arrives before the host sent anything: without the WAN input drop the router itself
    gets a conntrack entry wan:PORT <-> peer, and the host's first packet to that peer must leave from a new
    port."""
    a = lab.host(nat=kind)
    s1, _ = servers
    s1.send_udp(f"{a.router.wan_ip}:{PORT}", "early punch", port=ECHO_PORT)
    (seen,) = observed(a, s1)
    assert seen.split(":")[0] == a.router.wan_ip
    assert (seen != f"{a.router.wan_ip}:{PORT}") is moves


def test_udp_blocked_lets_only_tcp_out(lab, servers):
    a = lab.host(nat="udp-blocked")
    s1, _ = servers
    # Nothing reaches the server (a sentinel over its loopback proves it was listening)...
    send = partial(a.send_udp, f"{s1.ip}:{PORT}", "from behind the firewall", port=PORT)
    assert s1.first_arrival(PORT, send) is None
    # ...though the same datagram from an eim host does.
    b = lab.host(nat="eim")
    send = partial(b.send_udp, f"{s1.ip}:{PORT}", "from eim", port=PORT)
    assert s1.first_arrival(PORT, send) == f"{b.public_ip}:{PORT} from eim"
    tcp = a.echo("ask-tcp", f"{s1.ip}:{ECHO_PORT}", check=True)
    assert tcp.stdout.split(":")[0] == a.router.wan_ip


def test_cgnat_server_sees_the_carrier_address(lab, servers):
    a = lab.host(nat="cgnat")
    home = a.router
    assert home.upstream is not None
    assert home.wan_ip.startswith("100.")
    (seen,) = observed(a, servers[0])
    assert seen.split(":")[0] == home.upstream.wan_ip == a.public_ip
    assert seen.split(":")[0] != home.wan_ip


def test_two_cgnat_homes_can_share_one_carrier(lab, servers):
    a = lab.host(nat="cgnat")
    b = lab.host(router=lab.router("cgnat", carrier=a.router.upstream))
    assert a.public_ip == b.public_ip
    assert a.router.wan_ip != b.router.wan_ip
    assert observed(b, servers[0])[0].split(":")[0] == a.public_ip


def test_hosts_behind_one_router_reach_each_other_on_the_lan(lab):
    a = lab.host(nat="eim")
    b = lab.host(router=a.router)
    c = lab.host(router=a.router)
    assert len({a.ip, b.ip, c.ip}) == 3
    for src, dst in [(a, b), (b, c), (c, a)]:
        src.run(["ping", "-c1", "-W2", dst.ip], check=True)
    b.start_echo()
    assert observed(a, b) == [f"{a.ip}:{PORT}"]  # LAN traffic is not NATed


def test_every_kind_reaches_the_server(lab):
    s = lab.server()
    hosts = [lab.host(nat=k) for k in ("eim", "eim-nofw", "edm", "upnp", "udp-blocked", "cgnat", "public")]
    for h in hosts:
        h.run(["ping", "-c1", "-W2", s.ip], check=True)
