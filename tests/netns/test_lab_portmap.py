"""The upnp router runs a real miniupnpd: maps made with UPnP IGD, NAT-PMP and PCP really forward."""

from __future__ import annotations

import ipaddress
import secrets
import struct
from functools import partial

import pytest

from tests.netns.lab import ECHO_PORT, Host, Lab

pytestmark = pytest.mark.netns

INTERNAL = 41641

# A minimal PCP client run inside the host namespace: one MAP request (RFC 6887 §7.1 header + §11.1 MAP
# opcode), up to three tries, prints the raw reply as hex.
PCP_CLIENT = """
import socket, sys
req, gw, src = bytes.fromhex(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
s.settimeout(0.5)
for _ in range(3):
    s.sendto(req, (gw, 5351))
    try:
        print(s.recv(1100).hex())
        break
    except TimeoutError:
        pass
"""


def pcp_map_request(client_ip: str, internal_port: int, nonce: bytes, lifetime: int = 300) -> bytes:
    """MAP request for UDP ``internal_port``: RFC 6887 §7.1 common header then §11.1 MAP opcode data."""
    client = ipaddress.IPv6Address(f"::ffff:{client_ip}").packed
    header = struct.pack("!BBHI16s", 2, 1, 0, lifetime, client)  # version 2, R=0 opcode MAP(1)
    suggested_ip = ipaddress.IPv6Address("::ffff:0.0.0.0").packed
    return header + struct.pack("!12sB3xHH16s", nonce, 17, internal_port, internal_port, suggested_ip)


def parse_pcp_map_response(data: bytes) -> tuple[int, int, bytes, int, str]:
    """(result code, lifetime, nonce, assigned external port, assigned external IP) of a MAP response
    (RFC 6887 §7.2 header, §11.1 opcode data)."""
    assert len(data) >= 60, f"PCP response too short: {len(data)} bytes"
    version, r_op, _, result, lifetime, _epoch = struct.unpack_from("!BBBBII", data, 0)
    assert version == 2 and r_op == 0x81, f"not a MAP response: version {version} opcode {r_op:#x}"
    nonce, _proto, _internal, ext_port, ext_ip = struct.unpack_from("!12sB3xHH16s", data, 24)
    mapped = ipaddress.IPv6Address(ext_ip).ipv4_mapped
    return result, lifetime, nonce, ext_port, str(mapped)


@pytest.fixture
def upnp(lab: Lab) -> tuple[Host, Host]:
    a = lab.host(nat="upnp")
    s = lab.server()
    return a, s


def assert_forwarded(a: Host, s: Host, external_port: int) -> None:
    """An unsolicited datagram from the server to wan_ip:external_port reaches the host's INTERNAL port."""
    send = partial(s.send_udp, f"{a.router.wan_ip}:{external_port}", "via portmap", port=ECHO_PORT)
    assert a.first_arrival(INTERNAL, send) == f"{s.ip}:{ECHO_PORT} via portmap"


def test_without_a_map_nothing_gets_in(upnp):
    a, s = upnp
    send = partial(s.send_udp, f"{a.router.wan_ip}:{INTERNAL}", "no map", port=ECHO_PORT)
    assert a.first_arrival(INTERNAL, send) is None


def test_upnp_igd_map_forwards(upnp):
    a, s = upnp
    res = a.run(["upnpc", "-e", "lab", "-a", a.ip, str(INTERNAL), "40001", "UDP", "300"], timeout=20)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"external {a.router.wan_ip}:40001 UDP is redirected to internal {a.ip}:{INTERNAL}" in res.stdout
    assert_forwarded(a, s, 40001)


def test_natpmp_map_forwards(upnp):
    a, s = upnp
    res = a.run(["natpmpc", "-g", a.router.lan_ip, "-a", "40002", str(INTERNAL), "udp", "300"], timeout=20)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Public IP address : {a.router.wan_ip}" in res.stdout
    assert f"Mapped public port 40002 protocol UDP to local port {INTERNAL}" in res.stdout
    assert_forwarded(a, s, 40002)


def test_pcp_map_succeeds_and_forwards(upnp):
    a, s = upnp
    nonce = secrets.token_bytes(12)
    out = a.python(PCP_CLIENT, pcp_map_request(a.ip, INTERNAL, nonce).hex(), a.router.lan_ip, a.ip)
    assert out.strip(), "no PCP reply within 1.5 s"
    result, lifetime, got_nonce, ext_port, ext_ip = parse_pcp_map_response(bytes.fromhex(out.strip()))
    assert result == 0  # SUCCESS (RFC 6887 §7.4)
    assert got_nonce == nonce
    assert lifetime > 0
    assert ext_ip == a.router.wan_ip
    assert_forwarded(a, s, ext_port)


def test_secure_mode_refuses_a_map_for_another_lan_host(upnp, lab):
    a, _ = upnp
    b = lab.host(router=a.router)
    res = a.run(["upnpc", "-e", "lab", "-a", b.ip, str(INTERNAL), "40003", "UDP", "300"], timeout=20)
    assert res.returncode != 0
    assert "failed with code 718" in res.stdout  # miniupnpd's answer in secure mode
    assert f"dnat ip to {b.ip}" not in a.router.nft()


@pytest.mark.parametrize(("min_lifetime", "granted"), [(None, 3), (120, 120)])
def test_pcp_min_lifetime_is_configurable(lab, min_lifetime, granted):
    kwargs = {} if min_lifetime is None else {"pcp_min_lifetime": min_lifetime}
    a = lab.host(router=lab.router("upnp", **kwargs))
    request = pcp_map_request(a.ip, INTERNAL, secrets.token_bytes(12), lifetime=3)
    out = a.python(PCP_CLIENT, request.hex(), a.router.lan_ip, a.ip)
    result, lifetime, *_ = parse_pcp_map_response(bytes.fromhex(out.strip()))
    assert (result, lifetime) == (0, granted)
