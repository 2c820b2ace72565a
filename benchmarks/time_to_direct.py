"""Time to first ping and to a direct path for every NAT pairing of the lab (issue "NAT traversal").

For each scenario and run: a fresh lab (coordinator with its embedded relay and STUN on a public server, two
hosts behind the scenario's routers), two pre-auth keys created beforehand, then the clock starts and both
``meshd up`` are launched (enrollment included). Measured from that moment:

* first ping: the first ``ping -c1 -W 0.2`` from the first host to the second one's overlay address that
  is answered, in a tight loop; the address is read from the hosts block meshd writes
  (``/etc/netns/<ns>/hosts``), so the figure includes enrollment, the network map and the hosts file.
* direct: both daemons report ``path == "direct"`` for each other (the ``status`` document that
  ``meshd status --json`` prints, read from the control socket every 50 ms so polling costs no CPU). For the
  relay-only pairs (EDM-EDM, UDP blocked) the path must be ``relay`` and never ``direct``.
* hold: after the path is reached it is watched for ``--hold`` seconds; any change away from it is a flap.
* crossed hs: a tcpdump per host (UDP headers only) shows whether both WireGuards sent their first
  handshake initiation before the other's arrived. Then both answer as responders, neither may send data
  first, and the first ping waits for WireGuard's REKEY_TIMEOUT (5 s): the "ping > 4 s" column.

CPU: what the daemons had used when the first ping was answered ("meshd CPU", the larger of the two), the
joining daemon's CPU at its first log line ("CPU at start": imports), and the coordinator's since the
clock started; figures that a busy shared machine disturbs far less than wall times.

Also prints where the time goes (phases from the daemons' own log lines, later of the two daemons, p50
over runs: "start" is meshd's first line, ``starting (pid N)``, once Python is up and every module is
imported; then enrollment, stream open, STUN answered, call-me-maybe sent and first probe answered (these
two with ``--debug-logs``), direct decision; the first WireGuard handshake response from the capture) and
meshd's Python start-up cost: wall time of ``meshd --help`` and the CPU time of its imports (less
sensitive than wall time to the load of a shared machine).

Bytecode: by default the tree's modules are compiled first (``compileall``), as an installed meshd's are.
``--bytecode source`` removes meshd's and the coordinator's ``__pycache__`` and runs with
PYTHONDONTWRITEBYTECODE=1, so that every start compiles them again (what a checkout run with that
variable set pays: about 150 ms of CPU per start on this machine).

Every pairing runs with instant links and with 20 ms of one-way latency on each router's WAN link
(``-20ms``). ``join-eim``: two EIM nodes are up and direct, then the clock starts and a third joins; the
figures are the third node's first ping to the first one and both directions' direct paths.

    PYTHONPATH=. .venv/bin/python benchmarks/time_to_direct.py [--runs N] [--quick] [--only eim-eim,...]
        [--bytecode compiled|source]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.direct_throughput import cpu_seconds
from meshd import api
from tests.netns.lab import Host, Lab, LabError
from tests.netns.mesh import MESHD, Mesh, MeshError, Node

TARGET_PING = 0.5  #: at 0 ms
TARGET_JOIN_PING = 0.7  #: a third node joining a mesh of two
TARGET_DIRECT = 1.0
TARGET_LAN = 0.5  #: direct on a shared LAN
RUN_TIMEOUT = 30.0  #: seconds per run, from starting the daemons
SLOW_PING = 1.5  #: --dump-slow keeps runs whose first ping took longer (or whose handshakes crossed)
SLOW_DIRECT = 1.0  #: ... or whose expected direct path came later than the target
#: a daemon's log line that says a first handshake needed help (meshd.nat.endpoints): --dump-slow keeps it
HELPED = ("initiating again", "no WireGuard handshake from the peer yet")


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[Lab], tuple[Host, ...]]
    expect: str  #: "direct" or "relay"
    quick: bool = False
    timeout: float = RUN_TIMEOUT
    join: bool = False  #: the first two are up and direct before the clock starts; the third joins
    delayed: bool = False  #: 20 ms links: no targets (they are for instant links)


def _pair(a: dict[str, object], b: dict[str, object]) -> Callable[[Lab], tuple[Host, ...]]:
    return lambda lab: (lab.host(**a), lab.host(**b))  # type: ignore[arg-type]


def _same_lan(lab: Lab) -> tuple[Host, ...]:
    ha = lab.host(nat="eim")
    return ha, lab.host(router=ha.router)


def _three_eim(lab: Lab) -> tuple[Host, ...]:
    return lab.host(nat="eim"), lab.host(nat="eim"), lab.host(nat="eim")


def _delayed(sc: Scenario) -> Scenario:
    """The same pairing with 20 ms one-way latency on each router's (or public host's) WAN link."""

    def build(lab: Lab) -> tuple[Host, ...]:
        orig = lab.host

        def host(**kw: object) -> Host:
            if kw.get("router") is None:
                kw.setdefault("wan_delay_ms", 20)
            return orig(**kw)  # type: ignore[arg-type]

        lab.host = host  # type: ignore[method-assign,assignment]
        try:
            return sc.build(lab)
        finally:
            lab.host = orig  # type: ignore[method-assign]

    return Scenario(f"{sc.name}-20ms", build, sc.expect, timeout=sc.timeout, join=sc.join, delayed=True)


BASE_SCENARIOS = [
    Scenario("public-eim", _pair({"nat": "public"}, {"nat": "eim"}), "direct", quick=True),
    Scenario("eim-eim", _pair({"nat": "eim"}, {"nat": "eim"}), "direct", quick=True),
    Scenario("upnp-edm", _pair({"nat": "upnp", "portmap": ("upnp",)}, {"nat": "edm"}), "direct"),
    Scenario("natpmp-edm", _pair({"nat": "upnp", "portmap": ("natpmp",)}, {"nat": "edm"}), "direct"),
    Scenario("pcp-edm", _pair({"nat": "upnp", "portmap": ("pcp",)}, {"nat": "edm"}), "direct"),
    Scenario("cgnat-eim", _pair({"nat": "cgnat"}, {"nat": "eim"}), "direct"),
    Scenario("same-lan", _same_lan, "direct", quick=True),
    Scenario("join-eim", _three_eim, "direct", quick=True, join=True),
    Scenario("eim-nofw", _pair({"nat": "eim-nofw"}, {"nat": "eim-nofw"}), "direct", timeout=110.0),
    Scenario("edm-edm", _pair({"nat": "edm"}, {"nat": "edm"}), "relay", quick=True),
    Scenario("udpblocked-eim", _pair({"nat": "udp-blocked"}, {"nat": "eim"}), "relay"),
]
SCENARIOS = [*BASE_SCENARIOS, *(_delayed(s) for s in BASE_SCENARIOS if s.name != "same-lan")]

#: Phases of a daemon's start, from its own log lines (first match of each).
PHASES = [
    ("start", "ts="),  #: meshd's first line ("starting (pid N)"): Python up, modules imported
    ("enrolled", 'msg="enrolled as '),
    ("wg-go", "wireguard-go running"),
    ("up", 'msg="meshd up: '),
    ("stream", "coordinator stream connected"),
    ("stun", 'msg="public address(es)'),
    ("peer", "AddPeer("),
    ("relay", "relay default connected"),
    ("cmm", "call-me-maybe sent"),
    ("probe ok", 'answered"'),
    ("direct", " direct via "),
]
_TS = re.compile(r"^ts=(\S+) ")


@dataclass
class Run:
    ping: float | None = None  #: seconds from start to the first answered ping (a -> b)
    hosts: float | None = None  #: seconds until b's name was in a's hosts block
    path: float | None = None  #: seconds until both sides report the expected path
    flaps: int = 0  #: changes away from the expected path during the hold window
    wrong: bool = False  #: a relay-only pair went direct
    crossed: bool | None = None  #: both sides' first handshake initiations crossed (None: not captured)
    phases: dict[str, float] = field(default_factory=dict)
    #: CPU seconds (user + system) each process had used when the first ping was answered: a figure that a
    #: busy shared machine disturbs far less than wall time ("meshd" is the later daemon's)
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_trace: list[tuple[float, float]] = field(default_factory=list)  #: (s after start, CPU s) of alpha
    error: str = ""


def _peer_ip(mesh: Mesh, node: Node, peer: str) -> str | None:
    try:
        text = mesh.hosts_block(node)
    except OSError:
        return None
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and f"{peer}.mesh" in words[1:] and ":" not in words[0]:
            return words[0]
    return None


def _path(node: Node, peer: str) -> str | None:
    """The peer's path in the daemon's status document (None while the daemon or the peer is not there)."""
    try:
        doc = api.call(node.state_dir / "meshd.sock", "status", timeout=2.0)
    except api.ApiError:
        return None
    return next((str(p["path"]) for p in doc.get("peers", []) if p.get("name") == peer), None)


def _phases(node: Node, t0_wall: float) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        lines = node.log.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        m = _TS.match(line)
        if not m:
            continue
        for name, needle in PHASES:
            if name not in out and needle in line:
                ts = datetime.fromisoformat(m[1].replace("Z", "+00:00")).timestamp()
                out[name] = ts - t0_wall
    return out


WG_PORT = 41641  #: meshd's default WireGuard listen port (Mesh.up keeps it)
_PKT = re.compile(
    r"^(?P<ts>\d+\.\d+) (?P<pre>.*?)\bIP "
    r"(?P<src>[\d.]+)\.(?P<sport>\d+) > (?P<dst>[\d.]+)\.(?P<dport>\d+): UDP"
)


def start_capture(host: Host, path: Path) -> subprocess.Popen[bytes]:
    """tcpdump of the host's UDP (all interfaces: the relay proxy is on lo), headers only."""
    proc = host.popen(
        ["tcpdump", "-i", "any", "-n", "-U", "-s", "96", "-w", str(path), "udp"], stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # "listening on any ..." once it captures
        if b"listening" in (proc.stderr.read() or b""):
            break
        time.sleep(0.02)
    return proc


def wg_packets(path: Path) -> list[tuple[float, str, int, str, int, int, bool]]:
    """Every WireGuard message in a capture: (time, src, sport, dst, dport, type, sent) where either
    port is WireGuard's (type byte: 1 initiation, 2 response, 3 cookie, 4 data; whitepaper §5.4).

    ``sent``: this host's WireGuard sent it. Not "the source port is WireGuard's": the NATs of the lab
    keep port 41641, so on a direct path the peer's messages come from that port too. The capture (``-i
    any``) says which way a packet went, except on lo, where both ways show as "In": there WireGuard's
    own port (the relay proxies bind others) tells."""
    out = subprocess.run(
        ["tcpdump", "-r", str(path), "-n", "-tt", "-x"], capture_output=True, text=True, timeout=30
    ).stdout
    pkts: list[tuple[float, str, int, str, int, int, bool]] = []
    head: re.Match[str] | None = None
    hexdump: list[str] = []

    def flush() -> None:
        if head is None:
            return
        data = bytes.fromhex("".join(hexdump))
        ihl = (data[0] & 0x0F) * 4 if data else 20
        payload = data[ihl + 8 : ihl + 12]
        sport, dport = int(head["sport"]), int(head["dport"])
        wg = len(payload) == 4 and payload[0] in (1, 2, 3, 4) and payload[1:] == bytes(3)
        words = head["pre"].split()
        sent = "Out" in words or (words[:1] == ["lo"] and sport == WG_PORT)
        if wg and (sport if sent else dport) == WG_PORT:
            pkts.append((float(head["ts"]), head["src"], sport, head["dst"], dport, payload[0], sent))

    for line in out.splitlines():
        if line[:1].isdigit():
            flush()
            head, hexdump = _PKT.match(line), []
        elif line.strip().startswith("0x") and head is not None:
            hexdump.append("".join(line.split(":", 1)[1].split()))
    flush()
    return pkts


def wg_handshakes(path: Path, kind: int = 1) -> tuple[list[float], list[float]]:
    """(times WireGuard on this host sent a handshake initiation, times it received one), from a capture
    (``kind=2``: handshake responses).

    WireGuard messages (type byte 1 = initiation, 148 bytes; whitepaper §5.4.2) on the uplink and on lo
    (relay proxy) alike; which way each went: :func:`wg_packets`.
    """
    pkts = [p for p in wg_packets(path) if p[5] == kind]
    return [p[0] for p in pkts if p[6]], [p[0] for p in pkts if not p[6]]


_KINDS = {1: "init", 2: "resp", 3: "cookie", 4: "data"}


def _helped(*nodes: Node) -> bool:
    """A daemon's log says a first handshake had to be started again (``HELPED``)."""
    for node in nodes:
        with contextlib.suppress(OSError):
            text = node.log.read_text(errors="replace")
            if any(line in text for line in HELPED):
                return True
    return False


def dump_run(where: Path, mesh: Mesh, nodes: tuple[Node, Node], caps: list[Path], t0_wall: float) -> None:
    """Keep a slow or crossed run's evidence: both daemons' logs, the coordinator's, the captures and
    a timeline of the WireGuard messages each host sent and received (s after start; the first 30 data
    messages per host, every handshake message)."""
    where.mkdir(parents=True, exist_ok=True)
    for node in nodes:
        with contextlib.suppress(OSError):
            shutil.copy(node.log, where / f"{node.name}.log")
    with contextlib.suppress(OSError):
        shutil.copy(mesh.dir / "coordinator.log", where / "coordinator.log")
    lines = []
    for node, cap in zip(nodes, caps, strict=True):
        with contextlib.suppress(OSError):
            shutil.copy(cap, where / f"{node.name}.pcap")
        data = 0
        for ts, src, sport, dst, dport, kind, sent in wg_packets(cap):
            if kind == 4:
                data += 1
                if data > 30:
                    continue
            way = "sent" if sent else "recv"
            lines.append(
                (
                    ts,
                    f"{ts - t0_wall:8.3f} {node.name:6} {way} {_KINDS[kind]:6} {src}:{sport} > {dst}:{dport}",
                )
            )
    (where / "timeline.txt").write_text("".join(text + "\n" for _, text in sorted(lines)))


def crossed(a: tuple[list[float], list[float]], b: tuple[list[float], list[float]]) -> bool:
    """Both WireGuards sent their first initiation before the other's reached them: both answer as
    responders, neither can send data first, and both wait for REKEY_TIMEOUT (5 s) to retry."""
    (sa, ra), (sb, rb) = a, b
    return bool(sa and sb and (not ra or sa[0] < ra[0]) and (not rb or sb[0] < rb[0]))


def one_run(
    sc: Scenario, hold: float, capture: bool = True, debug_logs: bool = False, dump: Path | None = None
) -> Run:
    """One run; with ``dump``, a run with crossed first handshakes, a first ping later than ``SLOW_PING``
    s (or none) or a first handshake meshd had to start again (``HELPED``) leaves its evidence there
    (:func:`dump_run`)."""
    run = Run()
    with Lab() as lab, Mesh(lab) as mesh:
        mesh.start_coordinator(lab.server(name="coord"))
        hosts = sc.build(lab)
        # call-me-maybe and probe answers are logged at debug level (which costs time: opt-in)
        debug = ("--log-level", "debug") if debug_logs else ()
        if debug_logs:  # wireguard-go's own account of every handshake message, in the daemons' logs
            os.environ["MESHD_WG_LOG_LEVEL"] = "verbose"
        if sc.join:  # alpha joins a mesh of beta and gamma (beta: the one it pings)
            ha, hb, hc = hosts
            b = mesh.up(hb, "beta", extra=debug)
            c = mesh.up(hc, "gamma", extra=debug)
            mesh.wait_path(b, "gamma", "direct", within=15)
            mesh.wait_path(c, "beta", "direct", within=15)
        else:
            ha, hb = hosts
        keys = (mesh.new_key(), mesh.new_key())
        caps = [lab.tmpdir / "a.pcap", lab.tmpdir / "b.pcap"]
        tcpdumps = [start_capture(h, c) for h, c in zip((ha, hb), caps, strict=True)] if capture else []
        stop = threading.Event()
        coord_pid = mesh.coord_proc.pid if mesh.coord_proc is not None else None
        coord0 = cpu_seconds(coord_pid) if coord_pid is not None else None
        t0 = time.monotonic()
        t0_wall = time.time()
        a = mesh.up(ha, "alpha", key=keys[0], wait=False, extra=debug)
        if not sc.join:
            b = mesh.up(hb, "beta", key=keys[1], wait=False, extra=debug)
        deadline = t0 + sc.timeout

        def pinger() -> None:
            ip = None
            while not stop.is_set() and time.monotonic() < deadline:
                if ip is None:
                    ip = _peer_ip(mesh, a, "beta")
                    if ip is None:
                        time.sleep(0.01)
                        continue
                    run.hosts = time.monotonic() - t0
                t = time.monotonic()
                r = subprocess.run(
                    ["ip", "netns", "exec", ha.ns, "ping", "-n", "-q", "-c1", "-W", "0.2", ip],
                    capture_output=True,
                    timeout=5,
                )
                if r.returncode == 0:
                    run.ping = time.monotonic() - t0
                    run.cpu = _cpu_now(a, b if not sc.join else None, mesh)
                    if coord0 is not None and "coordinator" in run.cpu:  # this run's share, not its start
                        run.cpu["coordinator"] -= coord0
                    return
                time.sleep(max(0.0, 0.05 - (time.monotonic() - t)))  # an instant failure: don't spin

        def sampler() -> None:  # the joining daemon's CPU every 10 ms: how much of it was start-up
            pid = a.proc.pid if a.proc is not None else None
            while pid is not None and not stop.is_set() and time.monotonic() < deadline:
                if (c := cpu_seconds(pid)) > 0:  # 0: the process is gone
                    run.cpu_trace.append((time.time() - t0_wall, c))
                time.sleep(0.01)

        threading.Thread(target=sampler, daemon=True).start()
        th = threading.Thread(target=pinger, daemon=True)
        th.start()
        reached = {"a": False, "b": False}
        while time.monotonic() < deadline and not all(reached.values()):
            for key, node, peer in (("a", a, "beta"), ("b", b, "alpha")):
                p = _path(node, peer)
                if p == "direct" and sc.expect == "relay":
                    run.wrong = True
                if p == sc.expect:
                    reached[key] = True
            if run.wrong:
                break
            time.sleep(0.05)
        if all(reached.values()):
            run.path = time.monotonic() - t0
        th.join(max(0.0, deadline - time.monotonic()) + 6)
        stop.set()
        if run.path is not None:
            end = time.monotonic() + hold
            last = {"a": sc.expect, "b": sc.expect}
            while time.monotonic() < end:
                for key, node, peer in (("a", a, "beta"), ("b", b, "alpha")):
                    p = _path(node, peer)
                    if p != last[key]:
                        if last[key] == sc.expect:
                            run.flaps += 1
                        last[key] = p or "none"
                    if p == "direct" and sc.expect == "relay":
                        run.wrong = True
                time.sleep(0.1)
        pa, pb = _phases(a, t0_wall), _phases(b, t0_wall)
        if sc.join:  # beta started before the clock: its own start-up phases are not this run's
            run.phases = {k: (max(pa[k], pb[k]) if k in pb and pb[k] > 0 else pa[k]) for k in pa}
        else:
            run.phases = {k: max(pa[k], pb[k]) for k in pa.keys() & pb.keys()}
        if "start" in pa and run.cpu_trace:  # alpha's CPU when it logged its first line (imports done)
            before = [c for t, c in run.cpu_trace if t <= pa["start"]]
            if before:
                run.cpu["meshd at start"] = before[-1]
        for proc in tcpdumps:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if capture:
            run.crossed = crossed(wg_handshakes(caps[0]), wg_handshakes(caps[1]))
            answers = [t for cap in caps for t in wg_handshakes(cap, kind=2)[1]]  # responses received
            if answers:
                run.phases["wg hs"] = min(answers) - t0_wall
        slow = run.crossed or run.ping is None or run.ping > SLOW_PING
        slow = slow or (sc.expect == "direct" and (run.path is None or run.path > SLOW_DIRECT))
        if dump is not None and capture and (slow or _helped(a, b)):
            dump_run(dump / f"{sc.name}-{datetime.now():%H%M%S}", mesh, (a, b), caps, t0_wall)
        if run.ping is None or run.path is None:
            run.error = f"alpha log:\n{a.log_tail(12)}\nbeta log:\n{b.log_tail(12)}"
    return run


def _cpu_now(a: Node, b: Node | None, mesh: Mesh) -> dict[str, float]:
    """CPU used so far by the daemons (the larger of the two) and the coordinator."""
    out: dict[str, float] = {}
    daemons = [c for n in (a, b) if n is not None and n.proc is not None if (c := cpu_seconds(n.proc.pid))]
    if daemons:
        out["meshd"] = max(daemons)
    if mesh.coord_proc is not None:
        out["coordinator"] = cpu_seconds(mesh.coord_proc.pid)
    return out


def _fmt(values: list[float], target: float | None) -> tuple[str, str]:
    if not values:
        return "-", "-"
    p50, mx = statistics.median(values), max(values)
    mark = "" if target is None else (" ok" if mx <= target else " MISS")
    return f"{p50:.2f}", f"{mx:.2f}{mark}"


def startup_cost() -> list[str]:
    """meshd's own process start: `meshd --help` wall time and the heaviest imports of meshd.cli."""
    lines = []
    walls = []
    for _ in range(3):
        t = time.monotonic()
        subprocess.run([MESHD, "--help"], capture_output=True, timeout=30)
        walls.append(time.monotonic() - t)
    lines.append(f"`meshd --help` wall time: p50 {statistics.median(walls):.2f} s (3 runs)")
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import meshd.cli, meshd.daemon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows: list[tuple[int, str]] = []
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].strip()))
    total = sum(us for us, name in rows if name in ("meshd.cli", "meshd.daemon"))
    libs = sorted(((us, n) for us, n in rows if "." not in n and n != "meshd"), reverse=True)[:6]
    lines.append(
        f"import meshd.cli + meshd.daemon: {total / 1e6:.2f} s (-X importtime); heaviest packages: "
        + ", ".join(f"{n} {us / 1e6:.2f} s" for us, n in libs)
    )
    cpu = import_cpu()
    lines.append(
        f"import meshd.cli + meshd.daemon, CPU time: p50 {statistics.median(cpu) * 1000:.0f} ms, "
        f"min {min(cpu) * 1000:.0f} ms (5 runs)"
    )
    return lines


def import_cpu(runs: int = 5) -> list[float]:
    """CPU seconds (user + system) that importing what `meshd up` needs takes, once per fresh process."""
    code = (
        "import time; t = time.process_time(); import meshd.cli, meshd.daemon; print(time.process_time() - t)"
    )
    out = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        out.append(float(r.stdout.strip().splitlines()[-1]))
    return out


def prepare_bytecode(mode: str) -> None:
    """``compiled``: compile meshd and the coordinator (as installed); ``source``: drop their bytecode and
    write none, so that each process compiles every module it imports."""
    root = Path(__file__).resolve().parent.parent
    if mode == "compiled":
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(root / "meshd"), str(root / "coordinator")],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=300,
        )
        return
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # inherited by every daemon the lab starts
    for pkg in ("meshd", "coordinator"):
        for cache in (root / pkg).rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 run of a few scenarios")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--hold", type=float, default=5.0, help="seconds to watch the path after reaching it")
    ap.add_argument("--verbose", action="store_true", help="print each run as it ends")
    ap.add_argument(
        "--no-capture", action="store_true", help="skip the tcpdump of WireGuard handshakes (crossed column)"
    )
    ap.add_argument(
        "--debug-logs",
        action="store_true",
        help="daemons log at debug level: adds the call-me-maybe and first-probe-answered phases (slower)",
    )
    ap.add_argument(
        "--dump-slow",
        type=Path,
        metavar="DIR",
        help=f"keep logs, captures and a WireGuard message timeline of runs that crossed, pinged later "
        f"than {SLOW_PING:g} s, went direct later than {SLOW_DIRECT:g} s or restarted a first handshake "
        "in DIR/<scenario>-<time>/",
    )
    ap.add_argument(
        "--bytecode",
        choices=("compiled", "source"),
        default="compiled",
        help="compiled: as installed (default); source: every start compiles meshd's modules",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: needs root (network namespaces); run it as root")
    prepare_bytecode(args.bytecode)
    runs = 1 if args.quick else max(1, min(args.runs, 50))
    hold = min(max(0.0, args.hold), 60.0) if not args.quick else min(args.hold, 3.0)
    scenarios = [s for s in SCENARIOS if (not args.quick or s.quick)]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in SCENARIOS}
        if unknown:
            sys.exit(
                f"error: unknown scenario(s) {', '.join(sorted(unknown))}; "
                f"choose from {', '.join(s.name for s in SCENARIOS)}"
            )
        scenarios = [s for s in SCENARIOS if s.name in wanted]
    console = Console(width=150)
    load0 = os.getloadavg()
    results: dict[str, list[Run]] = {}
    t_all = time.monotonic()
    for sc in scenarios:
        results[sc.name] = []
        for i in range(runs):
            try:
                r = one_run(
                    sc, hold, capture=not args.no_capture, debug_logs=args.debug_logs, dump=args.dump_slow
                )
            except (LabError, MeshError) as e:
                r = Run(error=str(e).splitlines()[0])
            results[sc.name].append(r)
            if args.verbose or r.error:
                console.print(
                    f"{sc.name} run {i + 1}: ping {r.ping} path {r.path} flaps {r.flaps} crossed {r.crossed}"
                    + (f"\n{r.error}" if r.error else ""),
                    markup=False,
                    highlight=False,
                )
    table = Table(
        title=f"time to first ping / direct path ({runs} run(s) each; targets at 0 ms: ping <= "
        f"{TARGET_PING:g} s (join {TARGET_JOIN_PING:g} s), direct <= {TARGET_DIRECT:g} s (same LAN "
        f"{TARGET_LAN:g} s))"
    )
    for col in (
        "scenario",
        "first ping p50",
        "first ping max",
        "direct p50",
        "direct max",
        "hold",
        "ping > 4 s",
        "crossed hs",
        "failed",
    ):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for sc in scenarios:
        rs = results[sc.name]
        ping_target = None if sc.delayed else TARGET_JOIN_PING if sc.join else TARGET_PING
        ping = _fmt([r.ping for r in rs if r.ping is not None], ping_target)
        paths = [r.path for r in rs if r.path is not None]
        if sc.expect == "direct":
            direct = _fmt(
                paths, None if sc.delayed else TARGET_LAN if sc.name == "same-lan" else TARGET_DIRECT
            )
        else:
            direct = ("relay only", "went direct!" if any(r.wrong for r in rs) else "relay only")
        flaps = sum(r.flaps for r in rs)
        hold_txt = f"{flaps} flap(s)" if flaps else f"stable {hold:g} s"
        failed = sum(1 for r in rs if r.ping is None or r.path is None)
        slow = sum(1 for r in rs if r.ping is not None and r.ping > 4.0)
        cross = [r.crossed for r in rs if r.crossed is not None]
        cross_txt = f"{sum(cross)}/{len(cross)}" if cross else "-"
        table.add_row(
            sc.name, *ping, *direct, hold_txt, f"{slow}/{len(rs)}", cross_txt, f"{failed}/{len(rs)}"
        )
    console.print(table)
    phase_table = Table(title="where the time goes (s after start, later daemon, p50)")
    names = [*(n for n, _ in PHASES), "wg hs"]
    for col in ("scenario", *names, "hosts entry", "first ping", "CPU at start", "meshd CPU", "coord CPU"):
        phase_table.add_column(col, justify="left" if col == "scenario" else "right")
    for sc in scenarios:
        rs = results[sc.name]
        cells = []
        for n in names:
            vals = [r.phases[n] for r in rs if n in r.phases]
            cells.append(f"{statistics.median(vals):.2f}" if vals else "-")
        hv = [r.hosts for r in rs if r.hosts is not None]
        pv = [r.ping for r in rs if r.ping is not None]
        cells.append(f"{statistics.median(hv):.2f}" if hv else "-")
        cells.append(f"{statistics.median(pv):.2f}" if pv else "-")
        # CPU by the first ping, ms (the joining daemon's; the coordinator's since the clock started)
        for who in ("meshd at start", "meshd", "coordinator"):
            cv = [r.cpu[who] for r in rs if who in r.cpu]
            cells.append(f"{statistics.median(cv) * 1000:.0f} ms" if cv else "-")
        phase_table.add_row(sc.name, *cells)
    console.print(phase_table)
    for line in startup_cost():
        console.print(line, markup=False, highlight=False)
    load1 = os.getloadavg()
    console.print(
        f"wall {time.monotonic() - t_all:.0f} s; load average (1 min) {load0[0]:.2f} before, "
        f"{load1[0]:.2f} after ({os.cpu_count()} CPUs, shared); bytecode: {args.bytecode}",
        markup=False,
        highlight=False,
    )


if __name__ == "__main__":
    main()
