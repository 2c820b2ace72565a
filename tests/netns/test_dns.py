"""meshd's resolver in the lab, asked by real clients (`dig`, glibc's `getent`, `ssh`): mesh names, reverse
lookups, nothing else, and joins, renames and removals answered correctly within a second."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh, Node

pytestmark = [pytest.mark.netns, pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils)")]

RESOLVER = "100.100.100.100"


def dig(node: Node, *query: str) -> str:
    """``dig @100.100.100.100 QUERY +short`` on the node's host (empty when no answer)."""
    r = node.host.run(["dig", f"@{RESOLVER}", "+short", "+time=1", "+tries=1", *query], timeout=10)
    return r.stdout.strip()


def rcode(node: Node, *query: str) -> str:
    r = node.host.run(["dig", f"@{RESOLVER}", "+time=1", "+tries=1", *query], timeout=10)
    return r.stdout.split("status: ", 1)[1].split(",", 1)[0] if "status: " in r.stdout else r.stdout


def test_names_reverse_lookups_and_changes_through_the_resolver(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server())
    # alpha keeps no hosts block where its resolver could be bypassed: names reach it only through DNS
    alpha = mesh.up(lab.host(nat="eim"), "alpha", extra=("--hosts-file", str(mesh.dir / "alpha-hosts")))
    beta = mesh.up(lab.host(nat="public"), "beta")
    mesh.wait_peer(alpha, "beta")
    assert mesh.status(alpha)["self"]["dns"] == RESOLVER
    beta_v4 = mesh.overlay_ip(beta)
    beta_v6 = next(ip for ip in mesh.status(beta)["self"]["ips"] if ":" in ip).split("/")[0]

    eventually(lambda: dig(alpha, "beta.mesh", "A") == beta_v4, within=5, what="beta.mesh A")
    assert dig(alpha, "BETA.mesh", "AAAA") == beta_v6
    assert dig(alpha, "-x", beta_v4) == "beta.mesh."
    assert dig(alpha, "alpha.mesh", "A") == mesh.overlay_ip(alpha)  # this node too
    assert rcode(alpha, "nobody.mesh", "A") == "NXDOMAIN"
    assert rcode(alpha, "example.com", "A") == "REFUSED"  # never forwarded, never answered
    # a peer cannot use alpha's resolver: it listens only on the local resolver address
    r = beta.host.run(["dig", f"@{mesh.overlay_ip(alpha)}", "+time=1", "+tries=1", "alpha.mesh"], timeout=10)
    assert "status: NOERROR" not in r.stdout

    # the host's stub resolver pointed at meshd (what systemd-resolved's ~mesh routing does): glibc and ssh
    etc = mesh._hosts_file(alpha.host).parent  # /etc/netns/<ns>/, removed with the mesh
    (etc / "resolv.conf").write_text(f"nameserver {RESOLVER}\nsearch mesh\noptions timeout:1 attempts:1\n")
    assert alpha.host.run(["getent", "ahostsv4", "beta.mesh"]).stdout.split()[0] == beta_v4
    assert alpha.host.run(["getent", "hosts", "beta.mesh"]).stdout.split()[0] == beta_v6  # AAAA first
    key = mesh.start_sshd(beta.host)
    r = mesh.ssh(alpha, "beta", "ip netns identify", key)
    assert r.returncode == 0 and r.stdout.strip() == beta.host.ns, r.stderr

    # join: counted from when the new node is enrolled (mesh.up returns once its daemon answers)
    gamma = mesh.up(lab.host(nat="public"), "gamma")
    t0 = time.monotonic()
    answer = eventually(lambda: dig(alpha, "gamma.mesh"), within=5, interval=0.02, what="gamma.mesh joined")
    joined = time.monotonic() - t0
    gamma_v4 = mesh.overlay_ip(gamma)  # after the clock: `meshd status` is a Python start-up of its own
    assert answer == gamma_v4

    # rename and removal: counted from when the admin command returned
    mesh.admin("nodes", "rename", "gamma", "delta")
    t0 = time.monotonic()
    eventually(
        lambda: dig(alpha, "delta.mesh") == gamma_v4 and rcode(alpha, "gamma.mesh") == "NXDOMAIN",
        within=5,
        interval=0.02,
        what="delta.mesh after the rename",
    )
    renamed = time.monotonic() - t0
    assert dig(alpha, "-x", gamma_v4) == "delta.mesh."
    mesh.admin("nodes", "remove", "delta")
    t0 = time.monotonic()
    eventually(lambda: rcode(alpha, "delta.mesh") == "NXDOMAIN", within=5, interval=0.02, what="removal")
    removed = time.monotonic() - t0
    assert rcode(alpha, "-x", gamma_v4) == "NXDOMAIN"  # an overlay address nobody holds

    # an admin record, for a machine that runs no meshd (`coordinator dns set`)
    mesh.admin("dns", "set", "printer", "10.9.8.7")
    t0 = time.monotonic()
    eventually(lambda: dig(alpha, "printer.mesh") == "10.9.8.7", within=5, interval=0.02, what="admin record")
    recorded = time.monotonic() - t0
    assert '"printer"' in mesh.admin("dns", "list", "--json").stdout
    assert alpha.host.run(["getent", "ahostsv4", "printer"]).stdout.split()[0] == "10.9.8.7"  # search mesh
    mesh.admin("dns", "remove", "printer")
    eventually(
        lambda: rcode(alpha, "printer.mesh") == "NXDOMAIN", within=5, interval=0.02, what="record gone"
    )
    took = f"join {joined:.2f} s, rename {renamed:.2f} s, removal {removed:.2f} s, dns set {recorded:.2f} s"
    print(f"resolver follows: {took}")
    assert max(joined, renamed, removed, recorded) < 1.0, took


def test_dns_off_runs_no_resolver_and_writes_no_hosts_block(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server())
    alpha = mesh.up(lab.host(nat="public"), "alpha", extra=("--dns", "off"))
    beta = mesh.up(lab.host(nat="public"), "beta", extra=("--dns", "hosts"))
    mesh.wait_peer(alpha, "beta")
    mesh.wait_peer(beta, "alpha")
    assert mesh.status(alpha)["self"]["dns"] is None
    assert "beta" not in mesh.hosts_block(alpha)
    assert f"BEGIN meshd {alpha.interface}" not in mesh.hosts_block(alpha), "not even empty markers"
    r = alpha.host.run(["ip", "-4", "addr", "show", "dev", alpha.interface], check=True)
    assert RESOLVER not in r.stdout
    # the positive control: --dns hosts keeps the hosts block and the resolver
    eventually(lambda: "alpha.mesh" in mesh.hosts_block(beta), within=5, what="beta's hosts block")
    assert mesh.status(beta)["self"]["dns"] == RESOLVER
    assert dig(beta, "alpha.mesh") == mesh.overlay_ip(alpha)
