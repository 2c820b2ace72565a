"""The lab's dual-stack option (issue 15): IPv6 routed without NAT, stateful firewalls on the routers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.netns.lab import Host, Lab

pytestmark = pytest.mark.netns

LISTEN6 = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::", int(sys.argv[1]))); s.settimeout(float(sys.argv[2]))
    if len(sys.argv) > 3:  # first send from the same port (opens our firewall towards that address)
        s.sendto(b"out", (sys.argv[3], int(sys.argv[4])))
    print("ready", flush=True)
    try:
        data, src = s.recvfrom(2048)
        print(src[0], src[1], data.decode(), flush=True)
    except TimeoutError:
        print("timeout", flush=True)
    """
)
SEND6 = (
    "import socket, sys; socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b'in', (sys.argv[1], 5001))"
)


def listen6(host: Host, port: int, timeout: float, *opener: str) -> subprocess.Popen[bytes]:
    proc = host.popen(
        [sys.executable, "-c", LISTEN6, str(port), str(timeout), *opener], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc


def result(proc: subprocess.Popen[bytes]) -> str:
    out, _ = proc.communicate(timeout=10)
    return out.decode().strip()


def ping6(src: Host, dst: str) -> bool:
    return src.run(["ping", "-6", "-n", "-c", "1", "-W", "2", dst], timeout=10).returncode == 0


@pytest.mark.parametrize("nat", ["edm", "cgnat"])
def test_dual_stack_host_is_routed_and_firewalled(lab: Lab, nat: str) -> None:
    s = lab.server(ipv6=True)
    h = lab.host(nat=nat, ipv6=True)
    assert s.ip6 is not None and h.ip6 is not None and h.ip6.startswith("2001:db8:")
    assert ping6(h, s.ip6)
    assert h.run(["ping", "-n", "-c", "1", "-W", "2", s.ip], timeout=10).returncode == 0, "IPv4 still works"
    # new inbound: dropped by the home router's firewall
    listener = listen6(h, 5001, 1.0)
    s.python(SEND6, h.ip6)
    assert result(listener) == "timeout"
    # after the host sent to the server from that port, the server's answer is let in, from its own address
    listener = listen6(h, 5001, 5.0, s.ip6, "5002")
    s.python(SEND6, h.ip6)  # from another port of the server: still new, dropped
    reply = (
        "import socket, sys; u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(('::', 5002)); "
    )
    s.python(reply + "u.sendto(b'in', (sys.argv[1], 5001))", h.ip6)
    assert result(listener) == f"{s.ip6} 5002 in", "no NAT: the source is the server's own address"


def test_ipv6_only_host(lab: Lab) -> None:
    s = lab.server(ipv6=True)
    h = lab.host(nat="eim", ipv6="only")
    assert h.ip == h.ip6
    assert h.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout.strip() == ""
    assert ping6(h, s.ip6 or "")
    assert h.run(["ping", "-n", "-c", "1", "-W", "1", s.ip], timeout=10).returncode != 0


def test_a_lab_without_ipv6_nodes_has_no_ipv6_addresses(lab: Lab) -> None:
    h = lab.host(nat="eim")
    assert h.ip6 is None
    assert "2001:db8" not in h.run(["ip", "-6", "addr"]).stdout
    assert "2001:db8" not in lab.inet.run(["ip", "-6", "addr"]).stdout
