"""A mesh on top of the namespace lab: a real coordinator on a public server, real meshd daemons on hosts.

    with Lab() as lab, Mesh(lab) as mesh:
        s = lab.server(); a = lab.host(nat="eim"); b = lab.host(nat="public")
        mesh.start_coordinator(s)
        na, nb = mesh.up(a, "alpha"), mesh.up(b, "beta")
        mesh.wait_peer(na, "beta"); assert mesh.ping(na, nb)

Everything goes through the user contract (DESIGN.md §2): ``coordinator`` admin commands over its
admin socket, ``meshd up`` in the host's namespace, ``meshd status --json`` to read state. Each host
gets its own ``/etc/hosts`` through ``ip netns exec``'s ``/etc/netns/<ns>/hosts`` bind mount, so meshd
edits its default hosts file and ``ssh <peer>`` resolves inside that namespace only. Interface names
are unique per mesh (wireguard-go's sockets are shared by all namespaces).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.eventually import EventuallyTimeout, eventually
from tests.netns.lab import Host, Lab, LabError

T = TypeVar("T")

BIN = Path(sys.executable).parent
COORDINATOR = str(BIN / "coordinator")
MESHD = str(BIN / "meshd")
COORD_PORT = 8080


class MeshError(LabError):
    """A mesh step failed; the message carries the relevant log tail."""


@dataclass
class Node:
    """One meshd: the host it runs on and where its files are."""

    host: Host
    name: str
    interface: str
    state_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = field(default=())

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Mesh:
    def __init__(self, lab: Lab, *, backend: str = "userspace") -> None:
        self.lab = lab
        self.backend = backend
        self.tag = secrets.token_hex(2)
        self.dir = Path(tempfile.mkdtemp(prefix="meshtest-"))
        self.coord_dir = self.dir / "coordinator"
        self.coord_host: Host | None = None
        self.coord_proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.nodes: list[Node] = []
        self._etc_netns: list[Path] = []
        self._users: set[str] = set()

    # -- coordinator -----------------------------------------------------------------------------------

    def start_coordinator(self, host: Host, *, extra: tuple[str, ...] = ()) -> str:
        self.coord_host = host
        self.coord_dir.mkdir(mode=0o700, exist_ok=True)
        log = open(self.dir / "coordinator.log", "ab")  # noqa: SIM115 - owned by the process
        self.coord_proc = host.popen(
            [
                COORDINATOR,
                "--state-dir",
                str(self.coord_dir),
                "serve",
                "--listen",
                f"{host.ip}:{COORD_PORT}",
                *extra,
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        self.url = f"http://{host.ip}:{COORD_PORT}"
        proc = self.coord_proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise MeshError(f"coordinator exited {proc.returncode}:\n{self.coordinator_log()}")
            r = host.run(
                ["python3", "-c", f"import urllib.request as u; u.urlopen('{self.url}/healthz', timeout=1)"]
            )
            return r.returncode == 0 and (self.coord_dir / "admin.sock").exists()

        self._wait(healthy, 20, "coordinator healthy", self.coordinator_log)
        return self.url

    @staticmethod
    def _wait(predicate: Callable[[], T], within: float, what: str, log: Callable[[], str]) -> T:
        """``eventually``, failing with a MeshError that carries the relevant log tail."""
        try:
            return eventually(predicate, within=within, interval=0.05, what=what)
        except EventuallyTimeout as e:
            raise MeshError(f"{e}\n{log()}") from None

    def stop_coordinator(self) -> None:
        if self.coord_proc is not None and self.coord_proc.poll() is None:
            self.coord_proc.send_signal(signal.SIGTERM)
            try:
                self.coord_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.coord_proc.kill()
                self.coord_proc.wait(5)

    def coordinator_log(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / "coordinator.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``coordinator --state-dir D ARGS`` (the admin socket is a file: no namespace needed)."""
        res = subprocess.run(
            [COORDINATOR, "--state-dir", str(self.coord_dir), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and res.returncode != 0:
            raise MeshError(f"coordinator {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
        return res

    def new_key(self, user: str = "tester", *more: str) -> str:
        if user not in self._users:
            self.admin("users", "create", user)
            self._users.add(user)
        return self.admin("keys", "create", "--user", user, *more).stdout.split()[-1]

    # -- meshd -----------------------------------------------------------------------------------------

    def _hosts_file(self, host: Host) -> Path:
        d = Path("/etc/netns") / host.ns
        if not (d / "hosts").exists():
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
            self._etc_netns.append(d)
        return d / "hosts"

    def up(
        self, host: Host, name: str, *, key: str | None = None, wait: bool = True, extra: tuple[str, ...] = ()
    ) -> Node:
        """Start ``meshd up`` on ``host`` as ``name`` (enrolling with a fresh key unless given one)."""
        self._hosts_file(host)
        node = Node(
            host=host,
            name=name,
            interface=f"m{self.tag}{len(self.nodes)}",
            state_dir=self.dir / f"meshd-{name}",
            log=self.dir / f"meshd-{name}.log",
            extra=extra,
        )
        self.nodes.append(node)
        self.start(node, key=key if key is not None else self.new_key())
        if wait:
            self.wait_ready(node)
        return node

    def start(self, node: Node, *, key: str | None = None) -> None:
        args = [
            MESHD,
            "up",
            "--coordinator",
            self.url,
            "--hostname",
            node.name,
            "--state-dir",
            str(node.state_dir),
            "--interface",
            node.interface,
            "--wg-backend",
            self.backend,
            *node.extra,
        ]
        env = {"MESHD_AUTH_KEY": key} if key else None
        log = open(node.log, "ab")  # noqa: SIM115 - owned by the process
        node.proc = node.host.netns.popen(args, stdout=log, stderr=log, env=env)
        log.close()

    def stop(self, node: Node, *, sig: int = signal.SIGTERM, within: float = 15.0) -> int | None:
        if node.proc is None or node.proc.poll() is not None:
            return node.proc.returncode if node.proc else None
        node.proc.send_signal(sig)
        try:
            return node.proc.wait(within)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(5)
            raise MeshError(f"meshd {node.name} did not stop within {within} s:\n{node.log_tail()}") from None

    def meshd(
        self, node: Node, *args: str, check: bool = True, timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        res = node.host.run([MESHD, *args, "--state-dir", str(node.state_dir)], timeout=timeout)
        if check and res.returncode != 0:
            raise MeshError(f"meshd {' '.join(args)} on {node.name}: {res.stderr.strip()}\n{node.log_tail()}")
        return res

    def status(self, node: Node) -> dict[str, Any]:
        return json.loads(self.meshd(node, "status", "--json").stdout)  # type: ignore[no-any-return]

    def wait_ready(self, node: Node, within: float = 30.0) -> None:
        sock = node.state_dir / "meshd.sock"

        def ready() -> bool:
            if node.proc is not None and node.proc.poll() is not None:
                raise MeshError(f"meshd {node.name} exited {node.proc.returncode}:\n{node.log_tail()}")
            return sock.exists() and self.meshd(node, "status", "--json", check=False).returncode == 0

        self._wait(ready, within, f"meshd {node.name} ready", node.log_tail)

    def peer(self, node: Node, name: str) -> dict[str, Any] | None:
        return next((p for p in self.status(node)["peers"] if p["name"] == name), None)

    def wait_peer(self, node: Node, name: str, *, present: bool = True, within: float = 10.0) -> float:
        """Wait until ``node`` lists (or no longer lists) peer ``name``; returns the seconds it took."""
        t0 = time.monotonic()
        state = "lists" if present else "no longer lists"
        self._wait(
            lambda: (self.peer(node, name) is not None) == present,
            within,
            f"{node.name} {state} peer {name}",
            node.log_tail,
        )
        return time.monotonic() - t0

    def wait_path(self, node: Node, peer: str, path: str, *, within: float = 10.0) -> float:
        """Wait until ``node`` reaches ``peer`` over ``path`` ("direct", "relay", "none"); seconds taken."""
        t0 = time.monotonic()
        seen: list[str] = []

        def on_path() -> bool:
            last = self.peer(node, peer)
            seen.append(last["path"] if last else "absent")
            return last is not None and last["path"] == path

        self._wait(
            on_path,
            within,
            f"{node.name} -> {peer} over {path}",
            lambda: f"path was {seen[-1]}\n{node.log_tail()}",
        )
        return time.monotonic() - t0

    def overlay_ip(self, node: Node) -> str:
        ips = self.status(node)["self"]["ips"]
        return str(next(ip for ip in ips if ":" not in ip).split("/")[0])

    def ping(self, src: Node, dst: Node | str, *, count: int = 1, wait: float = 2.0) -> bool:
        target = dst if isinstance(dst, str) else self.overlay_ip(dst)
        r = src.host.run(["ping", "-n", "-c", str(count), "-W", str(wait), target], timeout=count * wait + 10)
        return r.returncode == 0

    def wait_ping(self, src: Node, dst: Node | str, within: float = 10.0) -> float:
        """Wait until ``src`` pings ``dst`` over the mesh; returns the seconds it took."""
        t0 = time.monotonic()
        name = dst if isinstance(dst, str) else dst.name
        self._wait(lambda: self.ping(src, dst, wait=1.0), within, f"{src.name} pings {name}", src.log_tail)
        return time.monotonic() - t0

    def hosts_block(self, where: Node | Host) -> str:
        """The hosts file meshd edits on that node's host (its /etc/netns/<ns>/hosts)."""
        host = where.host if isinstance(where, Node) else where
        return (Path("/etc/netns") / host.ns / "hosts").read_text()

    # -- ssh -------------------------------------------------------------------------------------------

    def start_sshd(self, host: Host) -> Path:
        """A real sshd in ``host``'s namespace (port 22, keys only); returns the client's key file."""
        d = self.dir / f"ssh-{host.ns}"
        d.mkdir(exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True
        )
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"Port 22\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile {d}/sshd.pid\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        with open(d / "sshd.log", "ab") as log:
            proc = host.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)

        def listening() -> bool:
            if proc.poll() is not None:
                raise MeshError(f"sshd exited: {(d / 'sshd.log').read_text()}")
            return host.run(["sh", "-c", "ss -ltn | grep -q ':22 '"]).returncode == 0

        self._wait(listening, 10, "sshd listens on port 22", lambda: (d / "sshd.log").read_text())
        return d / "client_key"

    def ssh(self, src: Node, target: str, command: str, key: Path) -> subprocess.CompletedProcess[str]:
        return src.host.run(
            [
                "ssh",
                "-i",
                str(key),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
                f"root@{target}",
                command,
            ],
            timeout=30,
        )

    # -- teardown --------------------------------------------------------------------------------------

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(MeshError):
                self.stop(node)
        self.stop_coordinator()
        for d in self._etc_netns:
            shutil.rmtree(d, ignore_errors=True)
        if os.environ.get("MESH_KEEP_LOGS") is None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
