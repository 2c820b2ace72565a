"""The lab cleans up after itself, never collides with other runs, and cannot reach outside."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.lab import Lab, LabError, Namespace, list_namespaces, sweep_stale
from tests.netns.lab.netns import LOCK_DIR, PREFIX, STALE_AFTER, new_owner, ns_pids, owner_alive

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]

ALL_KINDS = ("eim", "eim-nofw", "edm", "upnp", "udp-blocked", "cgnat", "public")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def owned(lab: Lab) -> list[str]:
    return list_namespaces(f"{PREFIX}{lab.owner}-")


def test_close_leaves_no_namespace_process_or_file_behind():
    with Lab() as lab:
        hosts = [lab.host(nat=k) for k in ALL_KINDS]
        procs = [h.popen(["sleep", "300"]) for h in hosts]
        escaped = hosts[0].popen(["setsid", "-f", "sleep", "301"])  # leaves its process group at once
        escaped.wait(5)
        lingering = ns_pids(hosts[0].ns)
        assert len(lingering) == 2  # the first sleep and the escaped one
        upnpd = hosts[ALL_KINDS.index("upnp")].router.miniupnpd
        assert upnpd is not None and upnpd.poll() is None
        names = owned(lab)
        assert len(names) == len(lab.namespaces) >= 1 + len(ALL_KINDS) * 2
        pids = [p.pid for p in procs] + lingering + [upnpd.pid]
        assert all(alive(pid) for pid in pids)
        tmpdir = lab.tmpdir
    assert lab.closed
    assert owned(lab) == []
    assert not any(alive(pid) for pid in pids)
    assert not tmpdir.exists()
    assert not owner_alive(lab.owner)


def test_close_runs_when_the_body_fails():
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        a = lab.host(nat="upnp")
        proc = a.popen(["sleep", "300"])
        raise RuntimeError("boom")
    assert owned(lab) == []
    assert not alive(proc.pid)


def test_close_is_idempotent_and_a_closed_lab_refuses_work():
    lab = Lab()
    lab.close()
    lab.close()
    with pytest.raises(LabError, match="closed"):
        lab.server()


def test_two_labs_at_once_do_not_collide():
    with Lab() as one, Lab() as two:
        a, b = one.host(nat="eim"), two.host(nat="eim")
        assert a.name == b.name and a.ns != b.ns
        assert str(os.getpid()) in a.ns
        assert set(owned(one)).isdisjoint(owned(two))
        two.close()
        assert owned(two) == [] and owned(one)
        a.run(["ping", "-c1", "-W2", a.router.lan_ip], check=True)


def test_sweeper_removes_only_namespaces_of_dead_owners():
    dead = new_owner()  # nobody holds its lock: like a run that was killed
    stale = Namespace(f"{PREFIX}{dead}-h1")
    try:
        proc = stale.popen(["sleep", "300"])
        with Lab(sweep=False) as live:
            live.server()
            owners = {dead, live.owner}
            # Young namespaces are left alone, whoever owns them.
            assert sweep_stale(owners=owners) == []
            later = time.time() + STALE_AFTER + 1
            assert sweep_stale(now=later, owners=owners) == [stale.name]
            assert owned(live)  # its owner is alive: untouched
        assert stale.name not in list_namespaces()
        proc.wait(5)
        assert not alive(proc.pid)
    finally:
        stale.delete()
        (LOCK_DIR / f"{dead}.lock").unlink(missing_ok=True)


def test_unknown_kind_is_a_clear_error(lab):
    with pytest.raises(ValueError, match=r"unknown NAT kind 'full-cone' \(valid: public, eim,"):
        lab.host(nat="full-cone")
    with pytest.raises(ValueError, match=r"either nat= .* or router="):
        lab.host(nat="eim", router=lab.router("eim"))


def test_names_are_plain_and_checked(lab):
    a = lab.host(nat="eim", name="alice")
    assert a.name == "alice" and a.ns.endswith("-alice")
    with pytest.raises(ValueError, match="already used"):
        lab.server(name="alice")
    with pytest.raises(ValueError, match="bad name"):
        lab.server(name="Not/OK")


def real_ipv4_addresses_and_gateways() -> list[str]:
    """The machine's own (root namespace) IPv4 addresses and gateways: must be unreachable from the lab."""
    addrs = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout)
    routes = json.loads(subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, text=True).stdout)
    found = [a["local"] for link in addrs for a in link.get("addr_info", [])]
    found += [r["gateway"] for r in routes if "gateway" in r]
    return [ip for ip in found if not ipaddress.IPv4Address(ip).is_loopback]


def test_the_lab_cannot_reach_outside(lab):
    hosts = [lab.host(nat=k) for k in ALL_KINDS]
    outside = real_ipv4_addresses_and_gateways()
    assert outside, "the machine has no IPv4 address to check against"
    lab_net = ipaddress.IPv4Network("6.0.0.0/7")
    outside = [ip for ip in outside if ipaddress.IPv4Address(ip) not in lab_net]
    # The core has no default route: anything that is not the lab is unreachable from there.
    assert lab.inet.run(["ip", "-4", "route", "show", "default"], check=True).stdout == ""
    for ip in outside:
        res = lab.inet.run(["ip", "route", "get", ip])
        assert res.returncode != 0 and "unreachable" in res.stderr, res.stdout
    # Every namespace holds only the lab's own interfaces.
    expected = {"lo", "eth0", "wan0", "lan0", "inet0"}
    for ns in lab.namespaces:
        links = json.loads(ns.run(["ip", "-j", "link"], check=True).stdout)
        for link in links:
            name = link["ifname"]
            assert name in expected or (name[0] in "pi" and name[1:].isdigit()), f"{ns.name}: {name}"
    # And packets really die: the machine's own addresses do not answer from any lab host.
    for h in hosts:
        for ip in outside:
            assert h.run(["ping", "-c1", "-W1", ip]).returncode != 0, f"{h.name} reached {ip}"


KILLED_RUN = """
import sys, time
from tests.netns.lab import Lab
from tests.netns.lab.netns import ns_pids
lab = Lab()
a = lab.host(nat="upnp")
p = a.popen(["sleep", "300"])
for _ in range(100):  # until it has entered the namespace
    if p.pid in ns_pids(a.ns):
        break
    time.sleep(0.02)
print(lab.owner, lab.watchdog_pid, lab.tmpdir, flush=True)
time.sleep(60)
"""


def test_a_killed_run_is_cleaned_up_by_its_watchdog():
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        assert run.stdout is not None
        owner, watchdog, tmpdir = run.stdout.readline().split()
        names = list_namespaces(f"{PREFIX}{owner}-")
        assert len(names) == 3  # inet, the upnp router, the host
        pids = [pid for name in names for pid in ns_pids(name)]
        assert len(pids) >= 2  # miniupnpd and sleep
        run.kill()
        run.wait(5)
        deadline = time.monotonic() + 15
        while list_namespaces(f"{PREFIX}{owner}-") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list_namespaces(f"{PREFIX}{owner}-") == []
        assert not any(alive(pid) for pid in pids)
        deadline = time.monotonic() + 5
        while alive(int(watchdog)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(int(watchdog))
        assert not Path(tmpdir).exists()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(5)
