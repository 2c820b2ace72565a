"""Relay throughput: iperf3 over the mesh's relay path versus a bare wireguard-go pair, and a relay soak.

Part ``--iperf`` (namespace lab, root): two EDM hosts meshed by real ``meshd up`` daemons stay on the relay
path (coordinator with its embedded relay on a public server); iperf3 TCP runs over the overlay, alternating
with iperf3 over a bare wireguard-go pair (hand-configured, meshd's MTU) between two other public hosts of the
same lab. Prints both, the ratio (target: relay >= 50 % of direct), the UDP counters of every involved
namespace (/proc/net/snmp Udp: InErrors, RcvbufErrors, SndbufErrors... before/after: the relay path is
WireGuard -> meshd's loopback UDP proxy -> WebSocket -> relay -> WebSocket -> proxy -> WireGuard), the CPU
seconds each process used during the relay runs, and the coordinator's (relay's) RSS.

Part ``--transports`` (namespace lab, root; issue 14): in ONE lab, for each link delay (``--delays``,
default 0 and 20 ms one-way on each home's WAN link, the lab's user-space delay wire): iperf3 TCP over a
bare wireguard-go pair of public hosts (direct), meshd's direct path between two EIM homes (the same two
NAT routers the relayed pairs cross), and an EDM-EDM pair over the UDP relay ports with kernel forwarding,
with userspace forwarding, over the TCP relay, and over the TCP relay with the coordinator on asyncio's
loop instead of uvloop (``MESH_EVENT_LOOP=asyncio``); a peer-relay row once ``PEER_RELAY`` is set. All
paths are set up first and the rounds interleave them, so the shared machine's load hits every path
alike. Prints a Markdown table: Mbit/s, ratio to direct at the same delay, CPU seconds per GB carried by
the relay (coordinator) and by both meshd, and the load average. ``--py-spy DIR`` samples the TCP relay
rows' processes during their first round and prints where their time goes.

Part ``--capacity tcp|udp-kernel|udp-userspace`` (namespace lab, root): ``--pairs`` (default 50 here)
EDM-EDM pairs relayed by one coordinator at once (a policy lets only the two nodes of a pair see each
other), one iperf3 flow each for ``--seconds``: aggregate and per-pair Mbit/s, the relay's CPU from
/proc/PID/stat, the bytes its nftables counters saw (kernel forwarding), the load average. Bounded: the
lab must come up within CAPACITY_SETUP seconds.

Part ``--soak`` (loopback only, no root): starts a relay hub behind the real front (HTTP Upgrade on a
uvicorn port) in this process, connects 2*PAIRS real meshd RelayLinks with real signed tickets, and has
every client send 1300-byte packets to its partner for DURATION seconds (bounded). Prints delivered packets
and Mbit/s, drop counters (queue policy, unknown peer) and the process RSS (server and clients share this
process: an upper bound for the relay).

With neither flag both parts run (iperf first).

    PYTHONPATH=. .venv/bin/python benchmarks/relay_throughput.py --iperf [--seconds 5] [--repeat 2]
    PYTHONPATH=. .venv/bin/python benchmarks/relay_throughput.py --soak --pairs 200 --duration 60
    PYTHONPATH=. .venv/bin/python benchmarks/relay_throughput.py --transports [--delays 0,20] [--seconds 5]
        [--repeat 2] [--py-spy DIR]
    PYTHONPATH=. .venv/bin/python benchmarks/relay_throughput.py --capacity tcp --pairs 50 [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry

from coordinator.relay.front import install
from coordinator.relay.hub import RelayHub, RelayMetrics
from meshd import eventloop
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

    def on_packet(src: bytes, pkt: bytes | memoryview) -> None:
        received[0] += 1

    keys = [os.urandom(32) for _ in range(2 * pairs)]
    links = []
    t0 = time.monotonic()
    for i, k in enumerate(keys):
        node = SigningKey(os.urandom(32))  # the node key that signs the hello
        node_pub = b64encode(bytes(node.verify_key))
        t = ticket.make(i + 1, node_pub, b64encode(k), 1, seed, time.time()).encode()
        links.append(
            await rlink.connect(
                url,
                k,
                t,
                sign=lambda m, node=node: node.sign(m).signature,
                region_id=1,
                home=True,
                on_packet=on_packet,
            )
        )
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


@dataclass(frozen=True)
class Variant:
    """One relay path of the ``--transports`` matrix: the coordinator's flags, the environment both
    programs start with, and the ``relay_transport`` meshd must report before the runs."""

    name: str
    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    transport: str = "tcp"


#: the variants compared by ``--transports`` (issue 14), in one lab, interleaved round by round
VARIANTS: tuple[Variant, ...] = (
    # not relayed: meshd's direct path between two EIM homes, i.e. through the same two NAT routers as
    # the relayed pairs (the bare pair above has no routers): what the relay hop itself costs
    Variant("direct, meshd via 2 NAT routers", transport="direct"),
    Variant("UDP relay, kernel", transport="udp"),
    Variant("UDP relay, userspace", env=(("MESHRELAY_USERSPACE", "1"),), transport="udp"),
    Variant("TCP relay", flags=("--relay-udp-ports", "0")),
    # the TCP relay with fixed 4 MiB socket buffers (meshd.proto.relay.SOCK_BUF) instead of autotuning
    Variant(
        "TCP relay, fixed 4 MiB buffers",
        flags=("--relay-udp-ports", "0"),
        env=(("MESHRELAY_TCP_BUF", "fixed"),),
    ),
    # the same TCP relay on asyncio's own loop: what uvloop buys, measured in the same run
    Variant(
        "TCP relay, asyncio loop", flags=("--relay-udp-ports", "0"), env=(("MESH_EVENT_LOOP", "asyncio"),)
    ),
)


def _peer_relay_pair(lab: Any, mesh: Any, delay: float) -> tuple[Any, Any]:
    """An EDM-EDM pair and a third, public node turned into a peer relay (issue 14, "peer relays"); the
    coordinator (and its region relay) sits behind a 20 ms wire (`_relayed_pair`), so the peer relay is
    the closer one and the coordinator offers it; the data path does not cross that wire."""
    quiet = ("--dns", "off")
    mesh.up(lab.host(nat="public"), "hop", extra=quiet)
    mesh.admin("nodes", "relay", "hop", "on")
    a = mesh.up(lab.host(nat="edm", wan_delay_ms=delay), "alpha", extra=quiet)
    b = mesh.up(lab.host(nat="edm", wan_delay_ms=delay), "beta", extra=quiet)
    return a, b


#: The peer-relay row: a function (lab, mesh, delay_ms) -> (a, b) that builds a meshed pair whose packets
#: go over a peer relay (the coordinator is already started on ``mesh``), plus the ``relay_transport`` it
#: must report.
PEER_RELAY: tuple[Callable[[Any, Any, float], tuple[Any, Any]], str] | None = (_peer_relay_pair, "peer")


@dataclass
class Measured:
    """One path's runs at one link delay: Mbit/s per round, CPU seconds per process group, bytes moved."""

    mbit: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    gbytes: float = 0.0
    load: list[float] = field(default_factory=list)
    note: str = ""

    def add(self, mbit: float, seconds: float, used: dict[str, float]) -> None:
        self.mbit.append(mbit)
        self.gbytes += mbit * seconds / 8 / 1000
        self.load.append(os.getloadavg()[0])
        for k, v in used.items():
            self.cpu[k] = self.cpu.get(k, 0.0) + v

    def cpu_per_gb(self, who: str) -> str:
        """CPU seconds of the named process group(s) per GB carried (prefix match: "meshd" = both)."""
        used = sum(v for k, v in self.cpu.items() if k.startswith(who))
        return (
            f"{used / self.gbytes:.1f}" if self.gbytes and any(k.startswith(who) for k in self.cpu) else "-"
        )


@contextlib.contextmanager
def _env(pairs: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """``os.environ`` with ``pairs`` while processes are started (they keep it), restored after."""
    old = {k: os.environ.get(k) for k, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _relayed_pair(lab: Any, mesh: Any, v: Variant, delay: float) -> tuple[Any, Any]:
    """An EDM-EDM pair behind routers with ``delay`` ms WAN links, on variant ``v``'s relay path."""
    from tests.eventually import eventually

    quiet = ("--dns", "off")  # the benchmark uses addresses; the resolver plays no part
    with _env(v.env):
        far = v.name == "peer relay"  # the region relay 20 ms away: the peer relay is the closer one
        mesh.start_coordinator(lab.server(delay_ms=20) if far else lab.server(), extra=v.flags)
        if far and PEER_RELAY is not None:
            a, b = PEER_RELAY[0](lab, mesh, delay)
        else:
            nat = "eim" if v.transport == "direct" else "edm"
            a = mesh.up(lab.host(nat=nat, wan_delay_ms=delay), "alpha", extra=quiet)
            b = mesh.up(lab.host(nat=nat, wan_delay_ms=delay), "beta", extra=quiet)
    mesh.wait_peer(a, "beta", within=20)
    mesh.wait_peer(b, "alpha", within=20)
    if v.transport == "direct":
        mesh.wait_path(a, "beta", "direct", within=30)
        mesh.wait_path(b, "alpha", "direct", within=30)
        mesh.wait_ping(a, b, within=15)
        return a, b
    for n, peer in ((a, "beta"), (b, "alpha")):

        def on_it(n: Any = n, peer: str = peer) -> bool:
            return bool((mesh.peer(n, peer) or {}).get("relay_transport") == v.transport)

        within = 60 if v.name == "peer relay" else 30  # the coordinator plans peer relays every 2 s
        eventually(on_it, within=within, what=f"{v.name}: {n.name} reports relay_transport {v.transport}")
    mesh.wait_ping(a, b, within=15)
    return a, b


def transports_part(
    seconds: float, rounds: int, delays: list[float], spy_dir: str | None, only: str | None = None
) -> None:
    """iperf3 TCP over a bare wireguard-go pair (direct) and each relay variant of an EDM-EDM pair, all in
    one lab, at each link delay; every path is set up first, then the rounds interleave the paths (the
    machine is shared: a load change hits every path alike). Prints a Markdown table: Mbit/s, the ratio
    to direct at the same delay, CPU seconds per GB carried by the relay (coordinator) and by both
    meshd, and the load average during the runs."""
    from benchmarks import direct_throughput as dt
    from tests.netns.lab import Lab, LabError
    from tests.netns.mesh import Mesh, MeshError

    variants = [v for v in VARIANTS if not only or only.lower() in v.name.lower()]
    if PEER_RELAY is not None:
        variants.append(Variant("peer relay", transport=PEER_RELAY[1]))
    load0 = os.getloadavg()
    results: dict[tuple[float, str], Measured] = {}
    t0 = time.monotonic()
    try:
        with Lab() as lab, contextlib.ExitStack() as stack:
            paths: dict[tuple[float, str], Callable[[], tuple[float, dict[str, float]]]] = {}
            for delay in delays:
                bare = dt.bare_pair(
                    lab,
                    lab.host(nat="public", wan_delay_ms=delay),
                    lab.host(nat="public", wan_delay_ms=delay),
                    mtu=dt.MESHD_MTU,
                )
                paths[(delay, "direct (bare wireguard-go)")] = functools.partial(
                    _measure, dt, bare.a, bare.b, bare.ip_b, seconds, {}
                )
                for v in variants:
                    mesh = stack.enter_context(Mesh(lab))
                    a, b = _relayed_pair(lab, mesh, v, delay)
                    procs = dt.mesh_procs(mesh, [a, b])
                    paths[(delay, v.name)] = functools.partial(
                        _measure, dt, a.host, b.host, mesh.overlay_ip(b), seconds, procs
                    )
            print(f"lab ready in {time.monotonic() - t0:.0f} s; load {os.getloadavg()[0]:.2f}", flush=True)
            if spy_dir:  # an extra round, not counted: the sampler costs the sampled processes CPU
                for key, procs in _spy_targets(paths, delays).items():
                    spies = _start_spies(spy_dir, key, procs)
                    paths[key]()
                    _stop_spies(spies)
            for _ in range(rounds):
                for key, run in paths.items():
                    mbit, used = run()
                    results.setdefault(key, Measured()).add(mbit, seconds, used)
    except (LabError, MeshError, dt.BenchError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")
    print(
        f"\nrelay paths, iperf3 TCP, {seconds:g} s x {rounds} (interleaved), EDM-EDM pairs; relay: "
        f"coordinator and meshd on {'uvloop' if _has_uvloop() else 'asyncio'} (except the asyncio-loop row's "
        f"relay); {os.cpu_count()} CPUs shared; load average {load0[0]:.2f} at start; 'vs meshd direct': the "
        "direct path meshd makes through the same two NAT routers (what a user's direct path is)"
    )
    print(
        "| path | link delay | Mbit/s p50 | runs | vs direct | vs meshd direct | relay CPU s/GB "
        "| meshd CPU s/GB | load |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for delay in delays:
        direct = statistics.median(results[(delay, "direct (bare wireguard-go)")].mbit)
        own = results.get((delay, "direct, meshd via 2 NAT routers"))
        meshd_direct = statistics.median(own.mbit) if own is not None and own.mbit else None
        for name in ["direct (bare wireguard-go)", *(v.name for v in variants)]:
            m = results[(delay, name)]
            p50 = statistics.median(m.mbit)
            print(
                f"| {name} | {delay:g} ms | {p50:.0f} | {', '.join(f'{x:.0f}' for x in m.mbit)} | "
                f"{p50 / direct:.2f} | {f'{p50 / meshd_direct:.2f}' if meshd_direct else '-'} | "
                f"{m.cpu_per_gb('coordinator')} | {m.cpu_per_gb('meshd')} | "
                f"{statistics.mean(m.load):.1f} |"
            )
        if PEER_RELAY is None:
            print(f"| peer relay | {delay:g} ms | n/a | - | - | - | - | - | - |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end; {time.monotonic() - t0:.0f} s in all")


def _has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def _measure(
    dt: Any, src: Any, dst: Any, ip: str, seconds: float, procs: dict[str, list[int]]
) -> tuple[float, dict[str, float]]:
    with dt.cpu_meter(procs) as used:
        mbit = dt.iperf(src, dst, ip, seconds).mbit
    return mbit, used


def _spy_targets(
    paths: dict[tuple[float, str], Any], delays: list[float]
) -> dict[tuple[float, str], dict[str, list[int]]]:
    """py-spy the processes of the TCP relay rows at the first delay (their first round)."""
    out = {}
    for key, run in paths.items():
        if key[0] == delays[0] and key[1].startswith("TCP relay"):
            procs = run.args[-1]
            out[key] = {k: v for k, v in procs.items() if not k.startswith("wireguard-go")}
    return out


def _start_spies(spy_dir: str, key: tuple[float, str], procs: dict[str, list[int]]) -> list[tuple[Any, str]]:
    from benchmarks.coordinator_scale import start_py_spy

    os.makedirs(spy_dir, exist_ok=True)
    out = []
    for who, pids in procs.items():
        path = os.path.join(spy_dir, f"{key[1]}-{who}.raw".replace(" ", "_").replace(",", ""))
        out.append((start_py_spy(path, pids[0]), path))
    return out


def _stop_spies(spies: list[tuple[Any, str]]) -> None:
    from benchmarks.coordinator_scale import stop_py_spy

    for proc, path in spies:
        print(f"-- py-spy {os.path.basename(path)} (self time, top 15)")
        stop_py_spy(proc, path)


CAPACITY_SETUP = 1800.0  #: seconds the capacity lab may take to come up (50 pairs: 22 min at load ~15)


def capacity_part(pairs: int, seconds: float, which: str) -> None:
    """``pairs`` EDM-EDM pairs relayed at once by one relay, each running one iperf3 TCP flow for
    ``seconds``: aggregate and per-pair throughput, the relay's (coordinator's) CPU from /proc/PID/stat,
    and for kernel forwarding the bytes its nftables counters saw. A policy lets only the two nodes of a
    pair see each other, so each meshd has one peer (as many relayed pairs, not a full mesh)."""
    from benchmarks import direct_throughput as dt
    from tests.eventually import eventually
    from tests.netns.lab import Lab, LabError
    from tests.netns.mesh import Mesh, MeshError

    v = {x.name: x for x in VARIANTS}[
        {"udp-kernel": "UDP relay, kernel", "udp-userspace": "UDP relay, userspace", "tcp": "TCP relay"}[
            which
        ]
    ]
    load0 = os.getloadavg()
    t0 = time.monotonic()
    deadline = t0 + CAPACITY_SETUP
    try:
        with Lab() as lab, Mesh(lab) as mesh:
            with _env(v.env):
                server = lab.server()
                mesh.start_coordinator(server, extra=v.flags)
            rules = "".join(
                f'[[rules]]\nsrc = ["node:a{i}"]\ndst = ["node:b{i}:*"]\n\n'
                f'[[rules]]\nsrc = ["node:b{i}"]\ndst = ["node:a{i}:*"]\n\n'
                for i in range(pairs)
            )
            (mesh.dir / "pairs.toml").write_text(rules)
            mesh.admin("policy", "set", str(mesh.dir / "pairs.toml"))
            key = mesh.new_key("tester", "--reusable")
            quiet = ("--dns", "off")
            nodes = [
                (
                    mesh.up(lab.host(nat="edm"), f"a{i}", key=key, wait=False, extra=quiet),
                    mesh.up(lab.host(nat="edm"), f"b{i}", key=key, wait=False, extra=quiet),
                )
                for i in range(pairs)
            ]
            for pair in nodes:
                for n in pair:
                    mesh.wait_ready(n, within=max(deadline - time.monotonic(), 1.0))
            for i, (a, b) in enumerate(nodes):
                for n, peer in ((a, f"b{i}"), (b, f"a{i}")):

                    def on_it(n: Any = n, peer: str = peer) -> bool:
                        return bool((mesh.peer(n, peer) or {}).get("relay_transport") == v.transport)

                    eventually(on_it, within=max(deadline - time.monotonic(), 1.0), what=f"{n.name} relayed")
            for a, b in nodes:
                mesh.wait_ping(a, b, within=max(deadline - time.monotonic(), 1.0))
            print(f"{pairs} relayed pairs ({v.name}) up in {time.monotonic() - t0:.0f} s", flush=True)
            load1 = os.getloadavg()
            assert mesh.coord_proc is not None
            relay_pid = mesh.coord_proc.pid
            meshd_pids = [n.proc.pid for pair in nodes for n in pair if n.proc is not None]
            servers = [b.host.popen(["iperf3", "-s", "-1", "-p", str(dt.IPERF_PORT)]) for _, b in nodes]
            for _, b in nodes:
                eventually(
                    lambda b=b: b.host.run(
                        ["ss", "-Hltn", f"sport = :{dt.IPERF_PORT}"], timeout=5
                    ).stdout.strip(),
                    within=10,
                    what=f"iperf3 server on {b.name}",
                )
            nft0 = _nft_bytes(server)
            cpu0, meshd0, w0 = (
                dt.cpu_seconds(relay_pid),
                sum(map(dt.cpu_seconds, meshd_pids)),
                time.monotonic(),
            )
            clients = [
                a.host.popen(
                    [
                        "iperf3",
                        "-c",
                        mesh.overlay_ip(b),
                        "-p",
                        str(dt.IPERF_PORT),
                        "-t",
                        f"{seconds:g}",
                        "-J",
                    ],
                    stdout=subprocess.PIPE,
                )
                for a, b in nodes
            ]
            outs = []
            for c in clients:
                try:
                    out, _ = c.communicate(timeout=seconds + 60)
                except subprocess.TimeoutExpired:
                    c.kill()
                    out, _ = c.communicate()
                outs.append(out)
            wall = time.monotonic() - w0
            cpu1, meshd1 = dt.cpu_seconds(relay_pid), sum(map(dt.cpu_seconds, meshd_pids))
            nft1 = _nft_bytes(server)
            for srv in servers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    srv.wait(5)
                if srv.poll() is None:
                    srv.kill()
                    srv.wait()
    except (LabError, MeshError, dt.BenchError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")
    mbits = []
    for out in outs:
        try:
            mbits.append(json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6)
        except (ValueError, KeyError, TypeError):
            mbits.append(0.0)
    total = sum(mbits)
    ok = sorted(m for m in mbits if m > 0)
    print(
        f"capacity: {pairs} relayed pairs ({v.name}), one iperf3 TCP flow each for {seconds:g} s at once\n"
        f"  aggregate {total:.0f} Mbit/s; per pair min {min(mbits):.1f}, median "
        f"{statistics.median(mbits):.1f}, max {max(mbits):.1f} Mbit/s; {len(mbits) - len(ok)} flows failed\n"
        f"  relay (coordinator pid {relay_pid}) CPU {cpu1 - cpu0:.1f} s in the {wall:.1f} s of the flows "
        f"({100 * (cpu1 - cpu0) / seconds:.0f} % of one core over {seconds:g} s of traffic; "
        f"{(cpu1 - cpu0) / max(total * seconds / 8 / 1000, 1e-9):.1f} s/GB); "
        f"all meshd {meshd1 - meshd0:.1f} s"
    )
    if nft0 is not None and nft1 is not None:
        print(
            f"  nftables counters in the relay's namespace: {(nft1 - nft0) / 1e6:.0f} MB "
            "forwarded by the kernel"
        )
    print(
        f"  load average {load0[0]:.2f} at start, {load1[0]:.2f} before the flows, {os.getloadavg()[0]:.2f} "
        f"after ({os.cpu_count()} CPUs, shared); {time.monotonic() - t0:.0f} s in all"
    )


def _nft_bytes(host: Any) -> int | None:
    """Bytes counted by every nftables counter in ``host``'s namespace (the relay's kernel forwarding
    counts each forwarded packet once per direction's rule), None without nft."""
    r = host.run(["nft", "list", "ruleset"], timeout=10)
    if r.returncode != 0:
        return None
    return sum(int(m) for m in re.findall(r"counter packets \d+ bytes (\d+)", r.stdout))


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
    ap.add_argument(
        "--delays", default="0,20", help="--transports: one-way WAN link delays, ms (default 0,20)"
    )
    ap.add_argument("--only", help="--transports: only the relay variants whose name has this text")
    ap.add_argument("--py-spy", metavar="DIR", help="--transports: py-spy the TCP relay rows' first round")
    ap.add_argument("--seconds", type=float, default=5.0, help="iperf: seconds per measurement")
    ap.add_argument("--repeat", type=int, default=2, help="iperf: alternating bare/relay rounds")
    ap.add_argument(
        "--capacity",
        choices=["tcp", "udp-kernel", "udp-userspace"],
        help="PAIRS relayed meshd pairs at once over this relay path (--pairs 50; root)",
    )
    ap.add_argument("--pairs", type=int, default=200, help="soak: relay client pairs; capacity: meshd pairs")
    ap.add_argument("--duration", type=float, default=60.0, help="soak: seconds")
    ap.add_argument("--size", type=int, default=1300, help="soak: packet size")
    ap.add_argument("--rate", type=int, default=50, help="soak: packets/s per client")
    ap.add_argument("--quick", action="store_true", help="iperf 1 round of 3 s; soak 20 pairs for 10 s")
    a = ap.parse_args()
    if a.capacity:
        if os.geteuid() != 0:
            sys.exit("error: --capacity needs root (network namespaces)")
        capacity_part(min(max(a.pairs, 1), 100), min(max(a.seconds, 1.0), 60.0), a.capacity)
        sys.exit(0)
    if a.transports:
        if os.geteuid() != 0:
            sys.exit("error: --transports needs root (network namespaces)")
        delays = [min(max(float(d), 0.0), 200.0) for d in a.delays.split(",") if d.strip()]
        rounds = min(max(a.repeat, 1), 10)
        transports_part(min(max(a.seconds, 1.0), 60.0), rounds, delays or [0.0], a.py_spy, a.only)
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
            eventloop.run(main(20, 10.0, a.size, a.rate))
        else:
            eventloop.run(main(a.pairs, min(a.duration, 600.0), a.size, a.rate))
