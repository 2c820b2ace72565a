"""meshd's PortMapper against the real miniupnpd in the lab's upnp router: map, forward, renew, delete."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.netns.lab import Lab

pytestmark = pytest.mark.netns

INTERNAL = 41641

# Runs the sans-IO PortMapper over a real UDP socket in the host namespace; prints events as JSON lines.
MAPPER = textwrap.dedent(
    """
    import json, select, socket, sys, time
    from meshd.nat.portmap import PortMapper, MapGranted
    gw, me = sys.argv[1], sys.argv[2]
    internal, lifetime, hold = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((me, 0))
    pm = PortMapper(gw, me, internal, lifetime=lifetime)
    t0 = time.monotonic()
    now = lambda: time.monotonic() - t0
    pm.start(now())
    closing = False
    while now() < hold + 10 and not pm.closed:
        if not closing and now() >= hold:
            pm.close(now()); closing = True
        for data, dst in pm.datagrams_to_send(now()):
            s.sendto(data, dst)
        t = pm.next_timer()
        wait = 0.05 if t is None else max(0.0, min(0.05, t - now()))
        if select.select([s], [], [], wait)[0]:
            data, src = s.recvfrom(2048)
            pm.receive(data, src, now())
        pm.handle_timer(now())
        while (ev := pm.next_event()) is not None:
            if isinstance(ev, MapGranted):
                ext = list(ev.external)
                msg = {"granted": ev.protocol, "external": ext, "lifetime": ev.lifetime}
                print(json.dumps(msg), flush=True)
            else:
                print(json.dumps({"lost": ev.reason}), flush=True)
    print(json.dumps({"closed": pm.closed}), flush=True)
    """
)


def test_portmapper_maps_renews_and_deletes_with_real_miniupnpd(lab: Lab) -> None:
    a = lab.host(nat="upnp")
    s = lab.server()
    router = a.router
    assert router is not None
    # lifetime 4 s: renewal at half-life happens during the 5 s hold
    out = a.python(MAPPER, router.lan_ip, a.ip, str(INTERNAL), "4", "5", timeout=30)
    events = [json.loads(line) for line in out.splitlines()]
    grants = [e for e in events if "granted" in e]
    assert grants, f"no mapping granted: {events}\n{router.miniupnpd_log()}"
    assert len(grants) >= 2, f"not renewed: {events}"
    ext_ip, ext_port = grants[0]["external"]
    assert ext_ip == router.public_ip
    assert all(g["external"] == grants[0]["external"] for g in grants), "renewal kept the same port"
    assert events[-1] == {"closed": True}, events
    # deleted on close: an unsolicited datagram to the old mapping no longer reaches the host
    listener = a.listen_udp(INTERNAL, timeout=1.5)
    s.send_udp(f"{ext_ip}:{ext_port}", "after-delete")
    assert listener.result() is None


def test_mapping_forwards_inbound_while_held(lab: Lab) -> None:
    a = lab.host(nat="upnp")
    s = lab.server()
    router = a.router
    assert router is not None
    proc = a.popen(
        [sys.executable, "-c", MAPPER, router.lan_ip, a.ip, str(INTERNAL), "60", "6"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    assert "granted" in first, first
    ext_ip, ext_port = first["external"]
    listener = a.listen_udp(INTERNAL, timeout=3)
    s.send_udp(f"{ext_ip}:{ext_port}", "through-the-map")
    got = listener.result()
    assert got is not None and got.endswith("through-the-map"), got
    proc.wait(timeout=20)


@pytest.mark.parametrize(
    ("speaks", "expect"), [(("natpmp",), "natpmp"), (("pcp",), "pcp"), (("upnp",), None)]
)
def test_router_speaking_one_protocol_is_mapped_with_it(
    lab: Lab, speaks: tuple[str, ...], expect: str | None
) -> None:
    a = lab.host(nat="upnp", portmap=speaks)
    router = a.router
    assert router is not None
    out = a.python(MAPPER, router.lan_ip, a.ip, str(INTERNAL), "60", "1", timeout=30)
    events = [json.loads(line) for line in out.splitlines()]
    grants = [e for e in events if "granted" in e]
    if expect is None:
        assert not grants, events  # UPnP only: NAT-PMP and PCP get no answer
        assert any("lost" in e for e in events) or events[-1] == {"closed": True}
    else:
        assert grants and all(g["granted"] == expect for g in grants), events


# Finds the IGD with meshd's own SSDP search (no miniupnpc discovery), maps through it and deletes.
UPNP_SEARCH = textwrap.dedent(
    """
    import json, sys, time
    from meshd.nat import upnp
    gw = sys.argv[1]
    t = time.monotonic()
    where = upnp.find_location(gw, within=2.0)
    found = time.monotonic() - t
    igd = upnp.Igd(upnp._client_at(where))
    m = igd.add_mapping(41641, 60, "search-test")
    igd.delete_mapping(m.external_port)
    print(json.dumps({"location": where, "found_s": found, "external": [m.external_ip, m.external_port]}))
    """
)


def test_our_ssdp_search_finds_miniupnpd_and_maps_through_it(lab: Lab) -> None:
    """UPnP-only router: the search answers with the router's description URL on its LAN address, and the
    client made from it maps (miniupnpc's own discovery would have waited a full second)."""
    a = lab.host(nat="upnp", portmap=("upnp",))
    router = a.router
    assert router is not None
    got = json.loads(a.python(UPNP_SEARCH, router.lan_ip, timeout=30))
    assert got["location"].startswith(f"http://{router.lan_ip}:")
    assert got["external"] == [router.wan_ip, INTERNAL]
    assert got["found_s"] < 2.0, "an answer, not the end of the window"
