"""Relay throughput: iperf3 over the mesh's relay path versus a bare wireguard-go pair, and a relay soak.

Part ``--iperf`` (namespace lab, root): two EDM hosts meshed by real ``meshd up`` daemons stay on the relay
path (coordinator with its embedded relay on a public server); iperf3 TCP runs over the overlay, alternating
with iperf3 over a bare wireguard-go pair (hand-configured, meshd's MTU) between two other public hosts of the
same lab. Prints both, the ratio (target: relay >= 50 % of direct), the UDP counters of every involved
namespace (/proc/net/snmp Udp: InErrors, RcvbufErrors, SndbufErrors... before/after: the relay path is
WireGuard -> meshd's loopback UDP proxy -> WebSocket -> relay -> WebSocket -> proxy -> WireGuard), the CPU
seconds each process used during the relay runs, and the coordinator's (relay's) RSS.

Part ``--transports`` (namespace lab, root; issue 14): the same iperf3 TCP flow over an EDM-EDM pair's
UDP relay ports with kernel forwarding, with userspace forwarding, over the TCP relay, through a peer relay
(a third, public mesh node; kernel forwarding), and over a bare
wireguard-go pair (direct), a fresh lab for each; prints a Markdown table with the ratios to direct.

Part ``--soak`` (loopback only, no root): starts a relay hub behind the real front (HTTP Upgrade on a
uvicorn port) in this process, connects 2*PAIRS real meshd RelayLinks with real signed tickets, and has
every client send 1300-byte packets to its partner for DURATION seconds (bounded). Prints delivered packets
and Mbit/s, drop counters (queue policy, unknown peer) and the process RSS (server and clients share this
process: an upper bound for the relay).

With neither flag both parts run (iperf first).

    PYTHONPATH=. .venv/bin/python benchmarks/relay_throughput.py --iperf [--seconds 5] [--repeat 2]
    PYTHONPATH=. .venv/bin/python benchmarks/relay_throughput.py --soak --pairs 200 --duration 60
    PYTHONPATH=. .venv/bin/python benchmarks/relay_throughput.py --transports [--seconds 5] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import statistics
import sys
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry

from coordinator.relay.front import install
from coordinator.relay.hub import RelayHub, RelayMetrics
from meshd.proto import ticket
from meshd.proto.encoding import b64encode
from meshd.relay import link as rlink


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main(pairs: int, duration: float, size: int, rate: int) -> None:
    seed = os.urandom(32)
    pub = bytes(SigningKey(seed).verify_key)
    hub = RelayHub("bench", 1, lambda t, now: ticket.verify(t, [pub], now), RelayMetrics(CollectorRegistry()))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(FastAPI(), log_level="warning", lifespan="off", backlog=4096)
    install(config, hub)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):  # bounded: uvicorn has no "started" event
        if server.started:
            break
        await asyncio.sleep(0.01)
    received = [0]

    def on_packet(src: bytes, pkt: bytes) -> None:
        received[0] += 1

    keys = [os.urandom(32) for _ in range(2 * pairs)]
    links = []
    t0 = time.monotonic()
    for i, k in enumerate(keys):
        t = ticket.make(i + 1, b64encode(k), seed, time.time()).encode()
        links.append(await rlink.connect(url, k, t, home=True, on_packet=on_packet))
    print(f"{len(links)} clients connected in {time.monotonic() - t0:.2f} s; RSS {rss_mib():.1f} MiB")
    payload = os.urandom(size)
    sent = 0
    end = time.monotonic() + duration
    interval = 0.01
    per_tick = max(1, rate * pairs * 2 // 100)  # packets per 10 ms across all clients
    while time.monotonic() < end:
        tick = time.monotonic()
        for j in range(per_tick):
            i = (sent + j) % len(links)
            links[i].send_packet(keys[i ^ 1], payload)
        sent += per_tick
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - tick)))
    await asyncio.sleep(1.0)
    hub.flush_counts()
    drops_queue = sum(c.drops for c in hub.conns)
    mbit = received[0] * size * 8 / duration / 1e6
    print(
        f"pairs {pairs}, {duration:.0f} s, {size} B packets: sent {sent}, delivered {received[0]} "
        f"({100 * received[0] / max(1, sent):.2f} %), {mbit:.1f} Mbit/s delivered"
    )
    print(f"queue drops (drop-oldest policy): {drops_queue}; relay RSS (incl. clients) {rss_mib():.1f} MiB")
    for ln in links:
        ln.close()
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 5)
    sock.close()


def relay_metrics(host: Any, url: str) -> dict[str, float]:
    """The coordinator's relay_* Prometheus samples (``name{labels}`` -> value), read from its /metrics."""
    code = f"import urllib.request as u; print(u.urlopen('{url}/metrics', timeout=5).read().decode())"
    out: dict[str, float] = {}
    for line in host.python(code, check=False).splitlines():
        if line.startswith("relay_") and not line.startswith("relay_protocol") and "_created" not in line:
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def socket_drops(host: Any) -> list[str]:
    """UDP and raw sockets in ``host``'s namespace that dropped datagrams (``ss -m`` skmem d<count>)."""
    out: list[str] = []
    entries: list[str] = []
    for line in host.run(["ss", "-Huwanmp"], timeout=10).stdout.splitlines():
        if line[:1].isspace() and entries:
            entries[-1] += " " + line.strip()  # ss prints skmem on a continuation line
        elif line.strip():
            entries.append(line)
    for line in entries:
        m = re.search(r"skmem:\(([^)]*)\)", line)
        if not m:
            continue
        drops = next((int(f[1:]) for f in m[1].split(",") if f.startswith("d") and f[1:].isdigit()), 0)
        if drops:
            words = line.split()
            proc = re.search(r'users:\(\("([^"]+)"', line)
            rb = next((f[2:] for f in m[1].split(",") if f.startswith("rb")), "?")
            where = words[4] if len(words) > 4 else "?"
            out.append(f"{words[0]} {where} ({proc[1] if proc else '?'}, rcvbuf {rb}): {drops} dropped")
    return out


#: the relay transports compared by ``--transports`` (issue 14): coordinator flags, environment, the
#: ``relay_transport`` meshd must report before the runs
TRANSPORTS: dict[str, tuple[tuple[str, ...], dict[str, str], str]] = {
    "UDP relay, kernel": ((), {}, "udp"),
    "UDP relay, userspace": ((), {"MESHRELAY_USERSPACE": "1"}, "udp"),
    "TCP relay": (("--relay-udp-ports", "0"), {}, "tcp"),
    # a third, public node as peer relay; the coordinator's control traffic crosses a 20 ms wire (so
    # the peer relay is the closer one), the data path does not
    "peer relay, kernel": ((), {}, "peer"),
}


def transports_part(seconds: float, rounds: int) -> None:
    """iperf3 TCP over each relay transport of an EDM-EDM pair (a fresh lab each) and a bare
    wireguard-go pair (direct), 0 ms links; prints a table with the ratio to direct."""
    from benchmarks import direct_throughput as dt
    from tests.eventually import eventually
    from tests.netns.lab import Lab, LabError
    from tests.netns.mesh import Mesh, MeshError

    quiet = ("--dns", "off")  # the benchmark pings by address; the resolver plays no part
    results: dict[str, list[float]] = {}
    try:
        with Lab() as lab:
            bare = dt.bare_pair(lab, lab.host(nat="public"), lab.host(nat="public"), mtu=dt.MESHD_MTU)
            results["direct (bare wireguard-go)"] = [
                dt.iperf(bare.a, bare.b, bare.ip_b, seconds).mbit for _ in range(rounds)
            ]
        for name, (flags, env, want) in TRANSPORTS.items():
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                with Lab() as lab, Mesh(lab) as mesh:
                    peer_relay = want == "peer"
                    coord = lab.server(name="coord", delay_ms=20 if peer_relay else 0)
                    mesh.start_coordinator(coord, extra=flags)
                    if peer_relay:
                        mesh.up(lab.host(nat="public"), "hop", extra=quiet)
                        mesh.admin("nodes", "relay", "hop", "on")
                    a = mesh.up(lab.host(nat="edm"), "alpha", extra=quiet)
                    b = mesh.up(lab.host(nat="edm"), "beta", extra=quiet)
                    mesh.wait_peer(a, "beta")
                    mesh.wait_peer(b, "alpha")
                    for n, peer in ((a, "beta"), (b, "alpha")):
                        eventually(
                            lambda n=n, peer=peer, want=want: (
                                (mesh.peer(n, peer) or {}).get("relay_transport") == want
                            ),
                            within=60 if peer_relay else 20,
                            what=f"{n.name}: relay_transport {want}",
                        )
                    mesh.wait_ping(a, b, within=10)
                    ip_b = mesh.overlay_ip(b)
                    results[name] = [dt.iperf(a.host, b.host, ip_b, seconds).mbit for _ in range(rounds)]
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    except (LabError, MeshError, dt.BenchError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")
    direct = statistics.median(results["direct (bare wireguard-go)"])
    print(f"relay transports, iperf3 TCP, {seconds:g} s x {rounds}, EDM-EDM, 0 ms links")
    print(f"| {'path':<28} | Mbit/s p50 | runs | vs direct |")
    print(f"|{'-' * 30}|-----------:|------|----------:|")
    for name, runs in results.items():
        p50 = statistics.median(runs)
        shown = ", ".join(f"{r:.0f}" for r in runs)
        print(f"| {name:<28} | {p50:10.0f} | {shown} | {p50 / direct:9.2f} |")


def iperf_part(seconds: float, rounds: int) -> None:
    """iperf3 over the relay path of a meshed EDM-EDM pair versus a bare wireguard-go pair (see above)."""
    from rich.console import Console
    from rich.table import Table

    from benchmarks import direct_throughput as dt
    from tests.netns.lab import Lab, LabError
    from tests.netns.mesh import Mesh, MeshError

    console = Console(width=150)
    load0 = os.getloadavg()
    try:
        with Lab() as lab, Mesh(lab) as mesh:
            a, b = dt.meshed_pair(lab, mesh, "edm", "edm", "relay")
            ip_b = mesh.overlay_ip(b)
            bare = dt.bare_pair(lab, lab.host(nat="public"), lab.host(nat="public"), mtu=dt.MESHD_MTU)
            assert mesh.coord_host is not None and mesh.coord_proc is not None
            relay_ns = {"alpha (edm)": a.host, "beta (edm)": b.host, "coordinator+relay": mesh.coord_host}
            bare_ns = {"bare a": bare.a, "bare b": bare.b}
            procs = dt.mesh_procs(mesh, [a, b])
            rss0 = dt.rss_mib(mesh.coord_proc.pid)
            res: dict[str, list[dt.Iperf]] = {"bare": [], "relay": []}
            drops = {k: dict.fromkeys(dt.UDP_COUNTERS, 0) for k in [*relay_ns, *bare_ns]}
            cpu: list[dict[str, float]] = []
            paths_after: list[str] = []
            rss_peak = rss0
            metrics0 = relay_metrics(mesh.coord_host, mesh.url)
            for _ in range(rounds):
                before = {k: dt.udp_counters(h) for k, h in bare_ns.items()}
                res["bare"].append(dt.iperf(bare.a, bare.b, bare.ip_b, seconds))
                for k, h in bare_ns.items():
                    for c, v in dt.counter_delta(before[k], dt.udp_counters(h)).items():
                        drops[k][c] += v
                before = {k: dt.udp_counters(h) for k, h in relay_ns.items()}
                with dt.cpu_meter(procs) as used:
                    res["relay"].append(dt.iperf(a.host, b.host, ip_b, seconds))
                rss_peak = max(rss_peak, dt.rss_mib(mesh.coord_proc.pid))
                for k, h in relay_ns.items():
                    for c, v in dt.counter_delta(before[k], dt.udp_counters(h)).items():
                        drops[k][c] += v
                cpu.append(used)
                peer = mesh.peer(a, "beta")
                paths_after.append(str(peer["path"]) if peer else "absent")
            rss1 = dt.rss_mib(mesh.coord_proc.pid)
            sockets = {k: socket_drops(h) for k, h in {**relay_ns, **bare_ns}.items()}
            metrics1 = relay_metrics(mesh.coord_host, mesh.url)
            meshd_rss = {n.name: dt.rss_mib(n.proc.pid) for n in (a, b) if n.proc is not None}
    except (LabError, MeshError, dt.BenchError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")
    p50 = {k: statistics.median(r.mbit for r in v) for k, v in res.items()}
    table = Table(title=f"relay-path TCP throughput (iperf3, {seconds:g} s x {rounds}, edm-edm)")
    for col in ("path", "Mbit/s p50", "runs (Mbit/s)", "retransmits", "vs bare direct"):
        table.add_column(col, justify="left" if col == "path" else "right")
    labels = {"bare": f"bare wireguard-go pair (direct), MTU {dt.MESHD_MTU}", "relay": "meshd over the relay"}
    for k in ("bare", "relay"):
        ratio = 100 * p50[k] / p50["bare"] if p50["bare"] else 0.0
        table.add_row(
            labels[k],
            f"{p50[k]:.0f}",
            " ".join(f"{r.mbit:.0f}" for r in res[k]),
            " ".join(str(r.retransmits) for r in res[k]),
            f"{ratio:.0f} %" + (" (target >= 50 %)" if k == "relay" else ""),
        )
    console.print(table)
    counters = Table(title="UDP counters during the runs (/proc/net/snmp Udp:, summed over rounds)")
    counters.add_column("namespace")
    for c in dt.UDP_COUNTERS:
        counters.add_column(c, justify="right")
    for k, d in drops.items():
        counters.add_row(k, *(str(d[c]) for c in dt.UDP_COUNTERS))
    console.print(counters)
    mean_cpu = {k: statistics.mean(c[k] for c in cpu) for k in cpu[0]}
    out = [
        "sockets that dropped (since they opened): "
        + ("; ".join(f"{k}: {', '.join(v)}" for k, v in sockets.items() if v) or "none"),
        f"CPU during a relay run (mean): {dt.fmt_cpu(mean_cpu, seconds)}",
        f"path after each relay run: {', '.join(paths_after)}",
        "relay metrics over the runs (incl. the bare rounds: nothing else uses the relay): "
        + ", ".join(
            f"{k} +{metrics1[k] - metrics0.get(k, 0.0):.0f}" for k in sorted(metrics1) if "clients" not in k
        ),
        f"relay (coordinator process) RSS: {rss0:.1f} MiB before, peak {rss_peak:.1f} MiB, "
        f"{rss1:.1f} MiB after; meshd RSS: " + ", ".join(f"{n} {v:.1f} MiB" for n, v in meshd_rss.items()),
        f"load average (1 min) {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
        f"({os.cpu_count()} CPUs, shared)",
    ]
    for line in out:
        console.print(line, markup=False, highlight=False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iperf", action="store_true", help="run the iperf3 part (root, namespace lab)")
    ap.add_argument("--soak", action="store_true", help="run the simulated-clients soak part")
    ap.add_argument(
        "--transports",
        action="store_true",
        help="iperf3 over each relay transport (UDP kernel, UDP userspace, TCP) vs direct (root)",
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="iperf: seconds per measurement")
    ap.add_argument("--repeat", type=int, default=2, help="iperf: alternating bare/relay rounds")
    ap.add_argument("--pairs", type=int, default=200, help="soak: relay client pairs")
    ap.add_argument("--duration", type=float, default=60.0, help="soak: seconds")
    ap.add_argument("--size", type=int, default=1300, help="soak: packet size")
    ap.add_argument("--rate", type=int, default=50, help="soak: packets/s per client")
    ap.add_argument("--quick", action="store_true", help="iperf 1 round of 3 s; soak 20 pairs for 10 s")
    a = ap.parse_args()
    if a.transports:
        if os.geteuid() != 0:
            sys.exit("error: --transports needs root (network namespaces)")
        transports_part(min(max(a.seconds, 1.0), 60.0), min(max(a.repeat, 1), 10))
        sys.exit(0)
    both = not (a.iperf or a.soak)
    if a.iperf or both:
        if os.geteuid() != 0:
            sys.exit("error: the iperf part needs root (network namespaces); run it as root or use --soak")
        if a.quick:
            iperf_part(3.0, 1)
        else:
            iperf_part(min(max(a.seconds, 1.0), 60.0), min(max(a.repeat, 1), 10))
    if a.soak or both:
        if a.quick:
            asyncio.run(main(20, 10.0, a.size, a.rate))
        else:
            asyncio.run(main(a.pairs, min(a.duration, 600.0), a.size, a.rate))
