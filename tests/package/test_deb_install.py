"""The .deb from scripts/package, installed in a throw-away Debian 12 container booted with systemd.

Never on this machine: a debootstrap'd bookworm root (minbase, systemd, iproute2 and exactly the packages
the .deb's Depends names, so a missing dependency shows up) is cached under CACHE once, and each run
boots an overlay of it with `systemd-nspawn -b --private-network` (its own network namespace, only
loopback to start with). Inside, through nsenter: `dpkg -i`, then coordinator.service and meshd.service
started by systemd from /etc/default settings, a second meshd in a network namespace of its own (a veth
pair, 192.168.77.0/24, exists only inside the container) as a transient systemd unit, both enrolled with
a pre-auth key from the installed admin CLI, a ping across the mesh, and `dpkg --purge` leaving nothing.
scripts/package also runs lintian and fails on an error, so a lintian error fails this test too.
Skipped with the reason when debootstrap, systemd-nspawn or root is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.eventually import eventually

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MESHVPN_TEST_ROOTFS_CACHE", "/var/cache/meshvpn-tests"))
MIRROR = "http://deb.debian.org/debian"
BASE = ["systemd", "systemd-sysv", "dbus", "iproute2"]  # what the test itself uses, beside the Depends
URL = "http://192.168.77.1:8080"
CAP_NET_BIND_SERVICE = 1 << 10
CAP_NET_RAW, CAP_NET_ADMIN = 1 << 13, 1 << 12
MESHD_CAPS = CAP_NET_ADMIN | CAP_NET_RAW | CAP_NET_BIND_SERVICE  # links and tun, probes, resolver port 53

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb", "lintian"):
        if shutil.which(tool) is None:
            return f"{tool} not found (scripts/setup installs it)"
    return None


def _depends(deb: Path) -> list[str]:
    """Package names in the .deb's Depends (first of each alternative, versions dropped)."""
    field = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True
    )
    return [d.split("|")[0].split("(")[0].strip() for d in field.stdout.split(",") if d.strip()]


def _rootfs(packages: list[str]) -> Path:
    """A cached bookworm root with these packages; built once with debootstrap (about 2 minutes)."""
    key = hashlib.sha256(",".join(sorted(packages)).encode()).hexdigest()[:12]
    target = CACHE / f"bookworm-{key}"
    if (target / "usr/bin/dpkg").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    try:
        r = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(sorted(packages))}", "bookworm",
             str(build), MIRROR],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        assert r.returncode == 0, f"debootstrap failed:\n{(r.stdout + r.stderr)[-4000:]}"
        build.rename(target)  # atomic: a half-built root is never taken for a cached one
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target


class Container:
    """A systemd-nspawn container booted on an overlay of ``lower``; commands run in it through nsenter."""

    def __init__(self, lower: Path, work: Path, deb: Path) -> None:
        self.dir = work
        self.merged = work / "merged"
        for d in ("upper", "work", "merged"):
            (work / d).mkdir()
        opts = f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.merged)], check=True)
        self.deb = f"/root/{deb.name}"
        shutil.copy(deb, self.merged / self.deb.lstrip("/"))
        self.log = work / "console.log"
        self.name = f"meshpkg{os.getpid() % 100000}"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-q", "-b", "-D", str(self.merged), "-M", self.name, "--register=no",
                 "--keep-unit", "--private-network"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            self._boot()
        except BaseException:
            self.close()
            raise

    def _boot(self) -> None:
        self.leader = eventually(self._leader, within=60, what="the container's init started")
        # "offline" until the container's systemd listens on its private socket; then --wait blocks
        state = eventually(
            lambda: (
                self.run(
                    ["systemctl", "is-system-running", "--wait"], timeout=120, check=False
                ).stdout.strip()
                not in ("offline", "")
                and self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            ),
            within=120,
            what="the container's systemd answers",
        )
        assert state in ("running", "degraded"), f"container boot: {state}\n{self.console()}"

    def _leader(self) -> int | None:
        assert self.proc.poll() is None, f"systemd-nspawn exited {self.proc.returncode}:\n{self.console()}"
        kids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        for pid in kids.split():
            # the container's PID 1: its innermost pid namespace number is 1
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
                if len(nspid) > 1 and nspid[-1] == "1":
                    return int(pid)
        return None

    def console(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def run(
        self, cmd: list[str], *, timeout: float = 60, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root"]
        r = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", *env, *cmd],
            capture_output=True, text=True, timeout=timeout, check=False, input=input,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd} exited {r.returncode}:\n{r.stdout}{r.stderr}\n{self.journal()}")
        return r

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-ec", script], **kw)  # type: ignore[arg-type]

    def journal(self) -> str:
        with contextlib.suppress(Exception):
            r = subprocess.run(
                ["nsenter", "-t", str(self.leader), "-a", "--", "journalctl", "--no-pager", "-n", "60",
                 "-u", "coordinator", "-u", "meshd", "-u", "meshd-beta"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            return "journal:\n" + r.stdout[-5000:]
        return ""

    def close(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for _ in range(10):
            if subprocess.run(["umount", str(self.merged)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)  # cleanup retry: the container's mounts go away with its last process
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def container(deb: Path) -> Iterator[Container]:
    lower = _rootfs(BASE + _depends(deb))
    work = Path(tempfile.mkdtemp(prefix="meshpkg-", dir="/var/tmp"))
    c = Container(lower, work, deb)
    try:
        yield c
    finally:
        c.close()


def _caps(c: Container, unit: str) -> tuple[int, int, int]:
    """(uid, effective, bounding) capabilities of a unit's main process."""
    pid = c.run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip()
    status = c.run(["cat", f"/proc/{pid}/status"]).stdout
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in status.splitlines() if ":" in line}
    return int(fields["Uid"][1]), int(fields["CapEff"][0], 16), int(fields["CapBnd"][0], 16)


def _peer(c: Container, state_dir: str, name: str) -> dict[str, object] | None:
    """Peer ``name`` in the status of the meshd with that state dir, once it has a handshake."""
    r = c.run(["meshd", "status", "--json", "--state-dir", state_dir], check=False)
    if r.returncode != 0:
        return None
    peers = json.loads(r.stdout)["peers"]
    return next((p for p in peers if p["name"] == name and p.get("last_handshake")), None)


def test_deb_installs_runs_both_services_under_systemd_meshes_two_nodes_and_purges(
    container: Container,
) -> None:
    c = container
    # install: user, links, conffiles, units
    c.run(["dpkg", "-i", c.deb], timeout=180)
    passwd = c.run(["getent", "passwd", "meshvpn"]).stdout.strip().split(":")
    assert passwd[5:] == ["/var/lib/coordinator", "/usr/sbin/nologin"], passwd
    assert c.run(["readlink", "/usr/bin/meshd"]).stdout.strip() == "/opt/meshvpn/bin/meshd"
    assert c.run(["stat", "-c", "%a %U", "/etc/default/meshd"]).stdout.split() == ["600", "root"]
    conffiles = c.run(["dpkg-query", "-W", "-f=${Conffiles}", "meshvpn"]).stdout
    assert "/etc/default/coordinator" in conffiles and "/etc/default/meshd" in conffiles
    assert c.run(["systemctl", "is-enabled", "coordinator", "meshd"], check=False).stdout.split() == [
        "disabled",
        "disabled",
    ]

    # a second host: network namespace beta behind a veth pair, inside the container only
    c.sh(
        "ip netns add beta; ip link add vb0 type veth peer name vb1; ip link set vb1 netns beta;"
        "ip addr add 192.168.77.1/24 dev vb0; ip link set vb0 up;"
        "ip -n beta addr add 192.168.77.2/24 dev vb1; ip -n beta link set vb1 up; ip -n beta link set lo up"
    )

    # the coordinator, as systemd runs it: user meshvpn, only CAP_NET_BIND_SERVICE
    c.sh(f"echo 'COORDINATOR_OPTS=\"--listen 0.0.0.0:8080 --public-url {URL}\"' > /etc/default/coordinator")
    c.run(["systemctl", "enable", "--now", "coordinator"], timeout=120)
    uid, eff, bnd = _caps(c, "coordinator")
    assert uid == int(passwd[2]) and eff == CAP_NET_BIND_SERVICE and bnd == CAP_NET_BIND_SERVICE
    c.run(["coordinator", "users", "create", "alice"])
    key = c.run(["coordinator", "keys", "create", "--user", "alice", "--reusable"]).stdout.split()[-1]

    # the installer writes /etc/hosts, debootstrap does not; meshd.service's ReadWritePaths= needs it
    c.sh("[ -e /etc/hosts ] || echo '127.0.0.1 localhost' > /etc/hosts")
    # node alpha: meshd.service from /etc/default/meshd (root, bounded to MESHD_CAPS)
    c.run(["sh", "-ec", "umask 077; cat > /etc/default/meshd"],
          input=f'MESHD_OPTS="--coordinator {URL} --hostname alpha"\nMESHD_AUTH_KEY={key}\n')  # fmt: skip
    c.run(["systemctl", "start", "meshd"], timeout=120)
    uid, eff, bnd = _caps(c, "meshd")
    assert uid == 0 and bnd == MESHD_CAPS and eff == bnd

    # node beta: the same binary as a transient unit in namespace beta, with its own state and interface
    c.run(
        ["sh", "-ec", "umask 077; cat > /root/beta.env; : > /etc/hosts.beta"], input=f"MESHD_AUTH_KEY={key}\n"
    )
    c.run(
        ["systemd-run", "--unit", "meshd-beta", "-p", "Type=notify",
         "-p", "NetworkNamespacePath=/run/netns/beta", "-p", "EnvironmentFile=/root/beta.env",
         "/usr/bin/meshd", "up", "--coordinator", URL, "--hostname", "beta",
         "--state-dir", "/var/lib/meshd-beta", "--interface", "mesh1", "--hosts-file", "/etc/hosts.beta"],
        timeout=120,
    )  # fmt: skip

    beta = eventually(
        lambda: _peer(c, "/var/lib/meshd", "beta"), within=60, what="alpha has a handshake with beta"
    )
    assert eventually(
        lambda: _peer(c, "/var/lib/meshd-beta", "alpha"),
        within=30, what="beta has a handshake with alpha",
    )  # fmt: skip
    beta_ip = str(beta["ips"][0]).split("/")[0]  # type: ignore[index]
    # no -I: the kernel's own source choice must be alpha's mesh address (the resolver's 100.100.100.100
    # on the same interface is scope host, so never a source beta's WireGuard would drop: baabd50)
    ping = ["ping", "-n", "-c", "1", "-W", "1", beta_ip]
    eventually(
        lambda: c.run(ping, check=False).returncode == 0,
        within=30, what=f"alpha pings beta ({beta_ip}) over the mesh",
    )  # fmt: skip
    assert "beta" in c.run(["cat", "/etc/hosts"]).stdout  # meshd.service may write /etc/hosts

    # purge: services stopped, state, user, conffiles and /opt gone
    c.run(["systemctl", "stop", "meshd-beta"], timeout=60)
    c.run(["dpkg", "--purge", "meshvpn"], timeout=120)
    assert c.run(["systemctl", "is-active", "coordinator", "meshd"], check=False).stdout.split() == [
        "inactive",
        "inactive",
    ]
    assert c.run(["getent", "passwd", "meshvpn"], check=False).returncode != 0
    left = c.sh(
        "for p in /opt/meshvpn /var/lib/coordinator /var/lib/private/coordinator /var/lib/meshd"
        " /etc/default/meshd /etc/default/coordinator /usr/bin/meshd; do [ -e $p ] && echo $p; done; true"
    ).stdout
    assert left == "", f"left behind after purge: {left}"
