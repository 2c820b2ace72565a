"""The raw IPv6 socket on the WireGuard port (issue 15): no IP header either way, so the BPF filter reads
the UDP header at offset 0 and the kernel fills the UDP checksum (a datagram with a bad one would never
reach the server's socket)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.netns.lab import Lab

pytestmark = pytest.mark.netns

SERVER = textwrap.dedent(
    """
    import socket, sys
    from meshd.proto import stun
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::", 3478)); s.settimeout(10)
    print("ready", flush=True)
    data, src = s.recvfrom(2048)
    print("got", src[0], src[1], stun.looks_like_stun(data), flush=True)
    reply = stun.answer(data, (src[0], src[1]))
    s.sendto(b"not stun, not a probe", src[:2])  # filtered out: no magic
    s.sendto(reply, (src[0], src[1] + 1))  # filtered out: another port
    s.sendto(reply, src[:2])
    """
)

CLIENT = textwrap.dedent(
    """
    import select, sys, time
    from meshd.nat.rawport import RawPort
    from meshd.proto import stun
    server = (sys.argv[1], 3478)
    with RawPort(41641) as rp:
        assert rp.sock6 is not None
        rp.send(stun.binding_request(b"t" * 12), server)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            select.select(rp.filenos(), [], [], 0.1)
            while (got := rp.recv()) is not None:
                src, data = got
                print("recv", src[0], src[1], stun.looks_like_stun(data), flush=True)
    """
)


def test_stun_over_raw_ipv6_from_the_wireguard_port(lab: Lab) -> None:
    s, h = lab.server(ipv6=True), lab.host(nat="edm", ipv6=True)
    assert s.ip6 is not None and h.ip6 is not None
    server = s.popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
    out = h.python(CLIENT, s.ip6, timeout=20)
    got, _ = server.communicate(timeout=10)
    assert got.decode().split() == ["got", h.ip6, "41641", "True"], "checksum valid, port and address kept"
    assert out.split("\n")[:-1] == [f"recv {s.ip6} 3478 True"], out
