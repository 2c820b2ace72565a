"""STUN from the WireGuard port while wireguard-go owns it: the learnt mapping is WireGuard's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
]

WG_PORT = 41641

STUN_SERVER = textwrap.dedent(
    """
    import socket, sys
    from meshd.proto import stun
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 3478)); s.settimeout(15)
    print("ready", flush=True)
    seen = []
    while len(seen) < 2:
        data, src = s.recvfrom(2048)
        reply = stun.answer(data, src)
        if reply is not None:
            s.sendto(reply, src)
            seen.append(f"stun {src[0]}:{src[1]}")
        else:
            seen.append(f"other {src[0]}:{src[1]}")
    print("\\n".join(seen), flush=True)
    """
)

STUN_CLIENT = textwrap.dedent(
    """
    import select, sys, time
    from meshd.nat.rawport import RawPort
    from meshd.proto import stun
    server = (sys.argv[1], 3478)
    client = stun.BindingClient(rto=0.2)
    with RawPort(int(sys.argv[2])) as rp:  # the I/O shell of the sans-I/O client, bounded at 5 s
        client.query(server, time.monotonic())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for data, dst in client.datagrams_to_send(time.monotonic()):
                rp.send(data, dst)
            select.select([rp], [], [], 0.1)
            while (got := rp.recv()) is not None:
                client.receive(got[1], got[0], time.monotonic())
            client.handle_timer(time.monotonic())
            ev = client.next_event()
            if ev is not None:
                print(ev)
                break
    """
)


def _wg(host, ifname: str, *args: str) -> None:  # type: ignore[no-untyped-def]
    host.run(["wg", "set", ifname, *args], check=True)


def test_stun_mapping_is_the_one_wireguard_uses(lab: Lab) -> None:
    a = lab.host(nat="eim")
    s = lab.server()
    ifname = f"rp{os.getpid() % 100000}"
    wg = a.popen(["wireguard-go", "-f", ifname])
    try:
        eventually(
            lambda: os.path.exists(f"/var/run/wireguard/{ifname}.sock"),
            within=5,
            what="wireguard-go's UAPI socket",
        )
        key = a.run(["wg", "genkey"], check=True).stdout.strip()
        peer = a.run(["wg", "pubkey"], input=a.run(["wg", "genkey"]).stdout, check=True).stdout.strip()
        a.run(["sh", "-c", f"echo {key} > /tmp/{ifname}.key"], check=True)
        _wg(a, ifname, "listen-port", str(WG_PORT), "private-key", f"/tmp/{ifname}.key")
        a.run(["ip", "link", "set", ifname, "up"], check=True)

        server = s.popen([sys.executable, "-c", STUN_SERVER], stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        out = a.python(STUN_CLIENT, s.ip, str(WG_PORT))
        assert "BindingSucceeded" in out, out
        # WireGuard now sends a handshake initiation to the same server port, from its own socket
        _wg(a, ifname, "peer", peer, "endpoint", f"{s.ip}:3478", "allowed-ips", "10.255.0.2/32")
        a.run(["ping", "-c1", "-W1", "-I", ifname, "10.255.0.2"])  # triggers a handshake attempt
        seen, _ = server.communicate(timeout=15)
        lines = seen.decode().split()
        stun_src, wg_src = lines[1], lines[3]
        assert lines[0] == "stun" and lines[2] == "other"
        assert stun_src == wg_src, f"STUN saw {stun_src}, WireGuard's packets came from {wg_src}"
        assert stun_src.startswith(a.public_ip + ":")
        assert f"mapped=('{a.public_ip}', {stun_src.split(':')[1]})" in out
    finally:
        wg.terminate()
        wg.wait(timeout=5)
        if os.path.exists(f"/tmp/{ifname}.key"):
            os.unlink(f"/tmp/{ifname}.key")


def test_filter_keeps_wireguard_data_away_from_the_raw_socket(lab: Lab) -> None:
    a = lab.host(nat="public")
    s = lab.server()
    code = textwrap.dedent(
        """
        import select, sys, time
        from meshd.nat.rawport import RawPort
        from meshd.proto import stun
        with RawPort(int(sys.argv[1])) as rp:
            print("ready", flush=True)
            got = []
            # part of the spec: listen for up to 3 s (or two packets), and only the STUN one may arrive
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and len(got) < 2:
                select.select([rp], [], [], 0.1)
                while (r := rp.recv()) is not None:
                    got.append("stun" if stun.looks_like_stun(r[1]) else "other")
            print(" ".join(got), flush=True)
        """
    )
    proc = a.popen([sys.executable, "-c", code, str(WG_PORT)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    sender = textwrap.dedent(
        """
        import socket, sys
        from meshd.proto import stun
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dst = (sys.argv[1], int(sys.argv[2]))
        s.sendto(b"\\x04\\x00\\x00\\x00" + bytes(40), dst)   # looks like WireGuard transport data
        s.sendto(b"hello", (sys.argv[1], int(sys.argv[2]) + 1))  # another port
        s.sendto(stun.binding_request(stun.new_transaction_id()), dst)
        """
    )
    s.python(sender, a.ip, str(WG_PORT))
    out, _ = proc.communicate(timeout=10)
    assert out.decode().split() == ["stun"]
