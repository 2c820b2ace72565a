"""Split DNS with a real systemd-resolved: the .deb's meshd.service with ``--dns resolved`` in a container.

systemd-resolved must never run on this shared machine (it would take over its /etc/resolv.conf), so it
runs in the same kind of throw-away Debian 12 container as test_deb_install: a second cached debootstrap
root that also holds systemd-resolved and libnss-resolve (their postinst points /etc/resolv.conf at
resolved's stub 127.0.0.53 and puts ``resolve`` into nsswitch.conf's hosts line, as on a real install).
Inside: the coordinator, meshd.service (node alpha, ``--dns resolved``) and a peer beta in a network
namespace; then resolved's view of the mesh link, ``getent`` through nss-resolve and through the stub,
a name outside the mesh domain that resolved must not route to the link, and the link's settings gone
after meshd stops; then the same again under ``--dns auto``, which picks resolved where it runs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.eventually import eventually
from tests.package import test_deb_install as pkg

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

RESOLVED = ["systemd-resolved", "libnss-resolve"]


@pytest.fixture
def container(deb: Path) -> Iterator[pkg.Container]:
    lower = pkg._rootfs(pkg.BASE + RESOLVED + pkg._depends(deb))
    work = Path(tempfile.mkdtemp(prefix="meshdns-", dir="/var/tmp"))
    c = pkg.Container(lower, work, deb)
    try:
        yield c
    finally:
        c.close()


def _link_settings(c: pkg.Container) -> str:
    """Every link's DNS servers and domains as resolved holds them."""
    return c.run(["resolvectl", "dns"]).stdout + c.run(["resolvectl", "domain"]).stdout


def _addresses(c: pkg.Container, cmd: list[str]) -> set[str]:
    """The addresses a ``getent ahosts`` answers with (empty when the name does not resolve)."""
    return {line.split()[0] for line in c.run(cmd, check=False).stdout.splitlines() if line.strip()}


def test_meshd_registers_split_dns_with_systemd_resolved_under_resolved_and_auto_and_reverts_it_on_stop(
    container: pkg.Container,
) -> None:
    c = container
    assert c.run(["systemctl", "is-active", "systemd-resolved"], check=False).stdout.strip() == "active", (
        c.run(["systemctl", "status", "--no-pager", "systemd-resolved"], check=False).stdout
    )
    c.run(["dpkg", "-i", c.deb], timeout=180)

    # the coordinator and a second host (namespace beta behind a veth pair), as in test_deb_install
    c.sh(
        "ip netns add beta; ip link add vb0 type veth peer name vb1; ip link set vb1 netns beta;"
        "ip addr add 192.168.77.1/24 dev vb0; ip link set vb0 up;"
        "ip -n beta addr add 192.168.77.2/24 dev vb1; ip -n beta link set vb1 up; ip -n beta link set lo up"
    )
    c.sh(
        f"echo 'COORDINATOR_OPTS=\"--listen 0.0.0.0:8080 --public-url {pkg.URL}\"' > /etc/default/coordinator"
    )
    c.run(["systemctl", "start", "coordinator"], timeout=120)
    c.run(["coordinator", "users", "create", "alice"])
    key = c.run(["coordinator", "keys", "create", "--user", "alice", "--reusable"]).stdout.split()[-1]
    c.sh("[ -e /etc/hosts ] || echo '127.0.0.1 localhost' > /etc/hosts")

    # node alpha: meshd.service, split DNS through resolved (an error, not a fallback, if resolved refuses)
    c.run(["sh", "-ec", "umask 077; cat > /etc/default/meshd"],
          input=f'MESHD_OPTS="--coordinator {pkg.URL} --hostname alpha --dns resolved"\n'
                f"MESHD_AUTH_KEY={key}\n")  # fmt: skip
    c.run(["systemctl", "start", "meshd"], timeout=120)
    # node beta: its own namespace, where resolved cannot see its interface: no host DNS at all
    c.run(["sh", "-ec", "umask 077; cat > /root/beta.env"], input=f"MESHD_AUTH_KEY={key}\n")
    c.run(
        ["systemd-run", "--unit", "meshd-beta", "-p", "Type=notify",
         "-p", "NetworkNamespacePath=/run/netns/beta", "-p", "EnvironmentFile=/root/beta.env",
         "/usr/bin/meshd", "up", "--coordinator", pkg.URL, "--hostname", "beta", "--dns", "off",
         "--state-dir", "/var/lib/meshd-beta", "--interface", "mesh1"],
        timeout=120,
    )  # fmt: skip

    beta = eventually(lambda: pkg._peer(c, "/var/lib/meshd", "beta"), within=60, what="alpha sees beta")
    beta_ips = [str(ip).split("/")[0] for ip in beta["ips"]]  # type: ignore[index,union-attr]
    me = json.loads(c.run(["meshd", "status", "--json"]).stdout)["self"]
    assert me["dns"] == "100.100.100.100", me

    # resolved's view of the link: the resolver, the routing-only domain, not a default route
    status = c.run(["resolvectl", "status", "mesh0"]).stdout
    assert "100.100.100.100" in status and "~mesh" in status, status
    assert "-DefaultRoute" in status or "Default Route: no" in status, status
    # names come from the resolver in this mode: no names in the hosts file, and no (empty) block either
    hosts_now = c.run(["cat", "/etc/hosts"]).stdout
    assert not any(ip in hosts_now for ip in beta_ips), hosts_now
    assert "BEGIN meshd" not in hosts_now and "END meshd" not in hosts_now, hosts_now

    # a real client: glibc through nss-resolve, and through nss-dns to the stub in /etc/resolv.conf
    assert (
        c.run(["readlink", "-f", "/etc/resolv.conf"]).stdout.strip()
        == "/run/systemd/resolve/stub-resolv.conf"
    )
    assert "resolve" in c.run(["grep", "^hosts:", "/etc/nsswitch.conf"]).stdout
    want = set(beta_ips)
    got = eventually(
        lambda: _addresses(c, ["getent", "ahosts", "beta.mesh"]),
        within=10, what="getent resolves beta.mesh through nss-resolve",
    )  # fmt: skip
    assert got == want, (got, want)
    assert _addresses(c, ["getent", "-s", "hosts:dns", "ahosts", "beta.mesh"]) == want  # the stub
    unknown = c.run(["resolvectl", "query", "--cache=no", "nobody.mesh"], check=False)
    assert unknown.returncode != 0 and "not found" in unknown.stderr.lower(), unknown.stderr

    # a name outside ~mesh: resolved has no server for it (the container has no other DNS); had it gone
    # to the mesh link, meshd would have answered REFUSED
    other = c.run(["resolvectl", "query", "--cache=no", "example.org"], check=False)
    assert other.returncode != 0, other.stdout
    assert "no appropriate name servers" in other.stderr.lower(), other.stderr
    assert "refused" not in other.stderr.lower(), other.stderr

    # stop: the interface and every per-link setting are gone
    c.run(["systemctl", "stop", "meshd"], timeout=60)
    assert c.run(["ip", "link", "show", "mesh0"], check=False).returncode != 0
    assert "no such device" in c.run(["resolvectl", "status", "mesh0"], check=False).stderr.lower()
    # the revert ran (before the interface went) and systemd-resolved took it: no tear-down warning
    journal = c.run(["journalctl", "--no-pager", "-o", "cat", "-u", "meshd"]).stdout
    assert "answers ~mesh on mesh0" in journal, journal[-3000:]  # the registration is in the journal
    assert "systemd-resolved link settings" not in journal, journal[-3000:]
    left = _link_settings(c)
    assert "100.100.100.100" not in left and "~mesh" not in left, left
    gone = c.run(["getent", "hosts", "beta.mesh"], check=False)
    assert gone.returncode != 0, gone.stdout

    # --dns auto picks resolved where it runs: the same split DNS again, from the kept state (no key used)
    c.sh("sed -i 's/--dns resolved/--dns auto/' /etc/default/meshd")
    c.run(["systemctl", "start", "meshd"], timeout=120)
    status = c.run(["resolvectl", "status", "mesh0"]).stdout
    assert "100.100.100.100" in status and "~mesh" in status, status
    again = eventually(
        lambda: _addresses(c, ["getent", "ahosts", "beta.mesh"]),
        within=10, what="beta.mesh resolves again under --dns auto",
    )  # fmt: skip
    assert again == want, (again, want)
    assert "BEGIN meshd" not in c.run(["cat", "/etc/hosts"]).stdout  # auto chose resolved: no block
    c.run(["systemctl", "stop", "meshd"], timeout=60)
    journal = c.run(["journalctl", "--no-pager", "-o", "cat", "-u", "meshd"]).stdout
    assert journal.count("answers ~mesh on mesh0") == 2, journal[-3000:]
    assert "systemd-resolved link settings" not in journal, journal[-3000:]
    left = _link_settings(c)
    assert "100.100.100.100" not in left and "~mesh" not in left, left
    c.run(["systemctl", "stop", "meshd-beta"], timeout=60)
