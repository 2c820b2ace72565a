"""Direct-path throughput: iperf3 TCP over a meshd pair versus a bare wireguard-go pair in the same lab.

Two hosts (public-public by default, ``--nat eim`` for EIM-EIM) are meshed by real ``meshd up`` daemons
through a real coordinator; once both report ``path == "direct"``, iperf3 runs over the overlay for
``--seconds``. In the same lab two other public hosts get a bare pair of ``wireguard-go`` interfaces set up
by hand (``wg genkey``/``wg set``, run-unique interface names: wireguard-go's UAPI sockets in
/var/run/wireguard are shared by all namespaces) and iperf3 runs over that. The bare pair runs at meshd's
interface MTU (the daemon-overhead comparison) and at wireguard-go's default 1420 (what the MTU choice costs).
Measurements alternate bare/mesh ``--repeat`` times; p50s and the ratio are printed (target: mesh >= 95 % of
bare: the daemon must add nothing to the data path), with the CPU seconds each process used during the mesh
runs (meshd should use ~none on a direct path) and the path after the run (a run that fell back to the relay
is flagged).

The helpers (bare pair, iperf3, UDP counters, per-process CPU/RSS) are shared with relay_throughput.py.

    PYTHONPATH=. .venv/bin/python benchmarks/direct_throughput.py [--seconds 5] [--repeat 2] [--nat eim]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.netns.lab import Host, Lab, LabError
from tests.netns.mesh import Mesh, MeshError, Node

WG_RUN = Path("/var/run/wireguard")
IPERF_PORT = 5201
MESHD_MTU = 1280  #: meshd/daemon.py configures its interface with this MTU
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark step failed (one line)."""


# -- a bare wireguard-go pair ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BarePair:
    a: Host
    b: Host
    ip_a: str
    ip_b: str
    ifaces: tuple[str, str]


def _wg_keypair() -> tuple[str, str]:
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True, timeout=10).stdout
    pub = subprocess.run(
        ["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return priv.strip(), pub.strip()


def bare_pair(lab: Lab, a: Host, b: Host, *, mtu: int, net: int = 77, port: int = 51820) -> BarePair:
    """wireguard-go on ``a`` and ``b`` (both public), peered by hand; 10.<net>.0.1 and .2 inside."""
    ifaces = (lab.unique_ifname("bw"), lab.unique_ifname("bw"))
    keys = (_wg_keypair(), _wg_keypair())
    hosts = (a, b)
    for i, (host, ifname) in enumerate(zip(hosts, ifaces, strict=True)):
        host.popen(["wireguard-go", "-f", ifname])
        sock = WG_RUN / f"{ifname}.sock"
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                raise BenchError(f"wireguard-go {ifname} made no UAPI socket within 10 s")
            time.sleep(0.02)
        key_file = lab.tmpdir / f"{ifname}.key"
        key_file.touch(mode=0o600)
        key_file.write_text(keys[i][0] + "\n")
        other = hosts[1 - i]
        host.netns.sh(
            f"wg set {ifname} private-key {key_file} listen-port {port} "
            f"peer {keys[1 - i][1]} allowed-ips 10.{net}.0.{2 - i}/32 endpoint {other.ip}:{port}\n"
            f"ip addr add 10.{net}.0.{1 + i}/24 dev {ifname}\n"
            f"ip link set {ifname} mtu {mtu} up\n"
        )
        key_file.unlink()
    return BarePair(a, b, f"10.{net}.0.1", f"10.{net}.0.2", ifaces)


# -- iperf3 ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Iperf:
    mbit: float  #: received by the server, Mbit/s
    retransmits: int
    seconds: float


def iperf(src: Host, dst: Host, dst_ip: str, seconds: float, *, port: int = IPERF_PORT) -> Iperf:
    """iperf3 TCP from ``src`` to ``dst_ip`` (an address of ``dst``) for ``seconds``; bounded."""
    server = dst.popen(["iperf3", "-s", "-1", "-p", str(port)])
    try:
        deadline = time.monotonic() + 5
        while dst.run(["ss", "-Hltn", f"sport = :{port}"], timeout=5).stdout.strip() == "":
            if server.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"iperf3 server on {dst.name} did not listen")
            time.sleep(0.05)
        r = src.run(
            [
                "iperf3",
                "-c",
                dst_ip,
                "-p",
                str(port),
                "-t",
                f"{seconds:g}",
                "-J",
                "--connect-timeout",
                "3000",
            ],
            timeout=seconds + 30,
        )
        try:
            doc = json.loads(r.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"iperf3 to {dst_ip}: exit {r.returncode}: {r.stderr.strip()[:200]}") from None
        if "error" in doc:
            raise BenchError(f"iperf3 to {dst_ip}: {doc['error']}")
        end = doc["end"]
        return Iperf(
            mbit=end["sum_received"]["bits_per_second"] / 1e6,
            retransmits=int(end["sum_sent"].get("retransmits", 0)),
            seconds=float(end["sum_received"]["seconds"]),
        )
    finally:
        if server.poll() is None:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(5)


# -- counters ----------------------------------------------------------------------------------------

UDP_COUNTERS = ("InDatagrams", "InErrors", "RcvbufErrors", "SndbufErrors", "NoPorts")


def udp_counters(host: Host) -> dict[str, int]:
    """The namespace's Udp: counters from /proc/net/snmp (what ``nstat -az`` calls UdpRcvbufErrors etc.)."""
    text = host.run(["cat", "/proc/net/snmp"], timeout=5).stdout
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    if len(rows) != 2:
        raise BenchError(f"no Udp counters in {host.name}'s /proc/net/snmp")
    return dict(zip(rows[0], map(int, rows[1]), strict=True))


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in UDP_COUNTERS}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pids_with_arg(arg: str) -> list[int]:
    """Pids whose command line has ``arg`` as one argument (e.g. a run-unique interface name)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if arg.encode() in (d / "cmdline").read_bytes().split(b"\0"):
                out.append(int(d.name))
    return out


@contextlib.contextmanager
def cpu_meter(procs: dict[str, list[int]]) -> Iterator[dict[str, float]]:
    """CPU seconds used by each named group of pids inside the ``with`` block."""
    before = {k: sum(cpu_seconds(p) for p in pids) for k, pids in procs.items()}
    used: dict[str, float] = {}
    yield used
    for k, pids in procs.items():
        used[k] = sum(cpu_seconds(p) for p in pids) - before[k]


def mesh_procs(mesh: Mesh, nodes: list[Node]) -> dict[str, list[int]]:
    """meshd, its wireguard-go, and the coordinator (with the embedded relay) as pid groups."""
    out: dict[str, list[int]] = {}
    for n in nodes:
        assert n.proc is not None
        out[f"meshd {n.name}"] = [n.proc.pid]
        out[f"wireguard-go {n.name}"] = [p for p in pids_with_arg(n.interface) if p != n.proc.pid]
    if mesh.coord_proc is not None:
        out["coordinator+relay"] = [mesh.coord_proc.pid]
    return out


def meshed_pair(lab: Lab, mesh: Mesh, nat_a: str, nat_b: str, path: str) -> tuple[Node, Node]:
    mesh.start_coordinator(lab.server(name="coord"))
    ha, hb = lab.host(nat=nat_a), lab.host(nat=nat_b)
    a, b = mesh.up(ha, "alpha", wait=False), mesh.up(hb, "beta", wait=False)
    mesh.wait_ready(a)
    mesh.wait_ready(b)
    mesh.wait_path(a, "beta", path, within=20)
    mesh.wait_path(b, "alpha", path, within=20)
    mesh.wait_ping(a, b, within=10)
    return a, b


def fmt_cpu(used: dict[str, float], seconds: float) -> str:
    return ", ".join(f"{k} {v:.1f} s ({100 * v / seconds:.0f} %)" for k, v in used.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration per measurement")
    ap.add_argument("--repeat", type=int, default=2, help="alternating bare/mesh rounds (default 2)")
    ap.add_argument("--nat", choices=["public", "eim"], default="public", help="the meshed pair's NAT")
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: needs root (network namespaces); run it as root")
    seconds = 3.0 if args.quick else min(max(args.seconds, 1.0), 60.0)
    rounds = 1 if args.quick else min(max(args.repeat, 1), 10)
    console = Console(width=150)
    load0 = os.getloadavg()
    try:
        with Lab() as lab, Mesh(lab) as mesh:
            a, b = meshed_pair(lab, mesh, args.nat, args.nat, "direct")
            ip_b = mesh.overlay_ip(b)
            same = bare_pair(lab, lab.host(nat="public"), lab.host(nat="public"), mtu=MESHD_MTU, net=77)
            dflt = bare_pair(lab, lab.host(nat="public"), lab.host(nat="public"), mtu=1420, net=78)
            procs = mesh_procs(mesh, [a, b])
            res: dict[str, list[Iperf]] = {"bare": [], "bare1420": [], "mesh": []}
            cpu: list[dict[str, float]] = []
            paths_after: list[str] = []
            for _ in range(rounds):
                res["bare"].append(iperf(same.a, same.b, same.ip_b, seconds))
                with cpu_meter(procs) as used:
                    res["mesh"].append(iperf(a.host, b.host, ip_b, seconds))
                cpu.append(used)
                peer = mesh.peer(a, "beta")
                paths_after.append(str(peer["path"]) if peer else "absent")
                res["bare1420"].append(iperf(dflt.a, dflt.b, dflt.ip_b, seconds))
    except (LabError, MeshError, BenchError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")
    p50 = {k: statistics.median(r.mbit for r in v) for k, v in res.items()}
    table = Table(
        title=f"direct-path TCP throughput (iperf3, {seconds:g} s x {rounds}, {args.nat}-{args.nat})"
    )
    for col in ("path", "Mbit/s p50", "runs (Mbit/s)", "retransmits", "vs bare (same MTU)"):
        table.add_column(col, justify="left" if col == "path" else "right")
    labels = {
        "bare": f"bare wireguard-go pair, MTU {MESHD_MTU}",
        "mesh": f"meshd direct, MTU {MESHD_MTU}",
        "bare1420": "bare wireguard-go pair, MTU 1420",
    }
    for k in ("bare", "mesh", "bare1420"):
        ratio = 100 * p50[k] / p50["bare"] if p50["bare"] else 0.0
        table.add_row(
            labels[k],
            f"{p50[k]:.0f}",
            " ".join(f"{r.mbit:.0f}" for r in res[k]),
            " ".join(str(r.retransmits) for r in res[k]),
            f"{ratio:.0f} %" + (" (target >= 95 %)" if k == "mesh" else ""),
        )
    console.print(table)
    mean_cpu = {k: statistics.mean(c[k] for c in cpu) for k in cpu[0]}
    console.print(
        f"CPU during a mesh run (mean): {fmt_cpu(mean_cpu, seconds)}", markup=False, highlight=False
    )
    console.print(f"path after each mesh run: {', '.join(paths_after)}", markup=False, highlight=False)
    load1 = os.getloadavg()
    console.print(
        f"load average (1 min) {load0[0]:.2f} before, {load1[0]:.2f} after ({os.cpu_count()} CPUs, shared; "
        "sender, receiver and both wireguard-go share them)",
        markup=False,
        highlight=False,
    )


if __name__ == "__main__":
    main()
