"""Stop stress test (issue 11): SIGTERM ends meshd within 5 s in every state and leaves nothing behind.

One lab for the whole module: the coordinator (which also runs the relay) on a public server; the nodes
that are stopped, ``alpha`` behind a miniupnpd router speaking all three protocols (PCP wins: a PCP map) and
``gamma`` behind one speaking UPnP IGD only (a UPnP map, made and deleted with blocking miniupnpc calls),
both with an inbound policy (so their nftables table exists); ``beta`` behind an EIM NAT as their peer (so
relay links, signalling and hole punching are active). Then, for every scenario, alpha and gamma in turn
are started and stopped REPEATS times, the stop landing at a random moment: 0-1.5 s after the spawn (python
start-up: the race with installing the signal handlers), 0-0.15 s after a fresh node wrote its keys (a
quarter of the starts are from an empty state dir with a new key: enrolment), 0-1.2 s after meshd's first
log line (bring-up, first map, punching, port maps) or 1.5-6 s after the spawn (steady state). Each cycle
reports where its stop landed (from the log).

- signal: SIGTERM to meshd only, or to its whole process group (meshd + wireguard-go, what
  ``systemctl stop`` does; the lab starts every process in its own session, so ``os.killpg`` hits both);
- coordinator: up the whole time; stopped at the same moment; already gone (stopped at a random moment
  between ``meshd up`` and the signal).

After each stop: meshd exited within 5 s of the signal, cleanly (0, or killed by that SIGTERM before it had
its handlers), and within 1 s of its exit there is no interface, no wireguard-go for it, no UAPI socket, no
hosts block, no ``inet meshd_<iface>`` table, no port map on the router (nftables DNAT rules and miniupnpd's
lease file), no runtime.json and no API socket, and no loop logged that it outlived its cancellation.
Stop times (max/median per scenario) are printed; failures list every bad cycle with its phase and the log
of that run (and py-spy's dump of a meshd that does not stop, if py-spy is installed). The random delay
before each stop is the one deliberate sleep in this file (it is the point of the test); everything else
waits with ``eventually``. Seed: MESHD_STOP_SEED (printed), repeats: MESHD_STOP_REPEATS (default 4: 48 stops).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshd import firewall, runtime
from meshd.wg.userspace import socket_path
from tests.eventually import EventuallyTimeout, eventually
from tests.netns.lab import Lab, Router
from tests.netns.mesh import MESHD, Mesh, Node

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(280)]

SEED = int(os.environ.get("MESHD_STOP_SEED") or random.SystemRandom().randrange(2**32))
REPEATS = int(os.environ.get("MESHD_STOP_REPEATS", "4"))
STOP_WITHIN = 5.0  #: the issue's bound, from the signal to meshd's exit
SETTLE = 1.0  #: after meshd exited: time for the kernel/router to finish what meshd asked for
MAX_DELAY = 6.0  #: signals land 0..MAX_DELAY s after `meshd up` was started
FRESH = 0.25  #: share of starts from an empty state dir (enrolment first)
STARTUP_WITHIN = 20.0  #: for meshd's first log line (python start-up on 2 busy cores)

POLICY = """\
# beta may ssh to alpha and gamma: they get an inbound rule set, i.e. an nftables table
[[rules]]
src = ["node:beta"]
dst = ["node:alpha:22", "node:gamma:22"]
proto = "tcp"
"""


@dataclass
class Cycle:
    scenario: str
    index: int
    node: str
    delay: float
    anchor: str  #: the delay counts from meshd's spawn or from its first log line
    phase: str = ""
    stop_time: float | None = None  #: seconds from the signal to meshd's exit (None: it did not exit)
    group_time: float | None = None  #: ... to the last process of its group gone (process-group stops)
    exit_code: int | None = None
    leftovers: list[str] = field(default_factory=list)
    log: str = ""
    stacks: str = ""  #: py-spy's dump of a meshd that did not stop in time
    fresh: bool = False  #: started from an empty state dir: enrols first
    exited_early: bool = False  #: meshd had exited before the signal (e.g. enrolment without coordinator)
    #: meshd had failed on its own before it handled the signal (its start-up failure is logged first: the
    #: coordinator was gone during enrolment) and was still tearing down when the signal came
    failed_first: bool = False

    @property
    def clean_exit(self) -> bool:
        """A stop is not a failure: exit 0, or death by the SIGTERM itself when it came before meshd had its
        handlers (then it had made nothing yet); systemd counts both as a clean stop, exit 1 as a failure."""
        return self.exited_early or self.failed_first or self.exit_code in (0, -signal.SIGTERM)

    @property
    def ok(self) -> bool:
        in_time = self.stop_time is not None and self.stop_time <= STOP_WITHIN
        return in_time and self.clean_exit and not self.leftovers


@dataclass
class World:
    lab: Lab
    mesh: Mesh
    stopped: list[tuple[Node, Router]]  #: the nodes that are stopped, with their routers
    beta: Node
    results: dict[str, list[Cycle]] = field(default_factory=dict)
    unenrolled: set[str] = field(default_factory=set)  #: nodes whose last fresh start may not have enrolled


# -- what a node leaves behind ---------------------------------------------------------------------------


def wireguard_go_pids(ifname: str) -> list[int]:
    """Live (not zombie) wireguard-go processes running ``ifname``, in any namespace."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if argv and argv[0].endswith(b"wireguard-go") and ifname.encode() in argv and state != "Z":
            pids.append(int(d.name))
    return pids


def port_maps(lab: Lab, node: Node, router: Router) -> list[str]:
    """The node's port maps on its router: DNAT rules to its address, entries in miniupnpd's lease file."""
    ip = node.host.ip
    found = []
    nat = router.run(["nft", "list", "table", "inet", "miniupnpd_nat"], timeout=10).stdout
    found += [f"router nft: {line.strip()}" for line in nat.splitlines() if "dnat" in line and ip in line]
    leases = lab.tmpdir / f"{router.name}-miniupnpd.leases"
    with contextlib.suppress(FileNotFoundError):
        found += [f"router lease: {line}" for line in leases.read_text().splitlines() if ip in line]
    return found


def leftovers(world: World, node: Node, router: Router) -> list[str]:
    iface = node.interface
    out = []
    if node.host.run(["ip", "link", "show", iface], timeout=10).returncode == 0:
        out.append(f"interface {iface}")
    if pids := wireguard_go_pids(iface):
        out.append(f"wireguard-go {pids}")
    if socket_path(iface).exists():
        out.append(f"UAPI socket {socket_path(iface)}")
    if f"BEGIN meshd {iface}" in world.mesh.hosts_block(node):
        out.append("hosts block")
    table = firewall.table_name(iface)
    if node.host.run(["nft", "list", "table", "inet", table], timeout=10).returncode == 0:
        out.append(f"nft table inet {table}")
    out += port_maps(world.lab, node, router)
    if runtime.path(node.state_dir).exists():
        out.append("runtime.json")
    if (node.state_dir / "meshd.sock").exists():
        out.append("meshd.sock")
    return out


def clean_up_after_failure(node: Node) -> None:
    """Remove what a failed cycle left, so the next cycle starts from nothing (and fails on its own)."""
    for pid in wireguard_go_pids(node.interface):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    eventually(lambda: not wireguard_go_pids(node.interface), within=5, what="stray wireguard-go killed")
    node.host.run([MESHD, "down", "--state-dir", str(node.state_dir)], timeout=30)
    node.host.run(["nft", "delete", "table", "inet", firewall.table_name(node.interface)], timeout=10)
    with contextlib.suppress(FileNotFoundError):
        (node.state_dir / "meshd.sock").unlink()
    with contextlib.suppress(FileNotFoundError):
        socket_path(node.interface).unlink()


def phase_of(log: str, fresh: bool) -> str:
    """Where the stop landed, from what the node logged before "stopping:"."""
    if "stopping:" not in log:
        return "python start-up"  # no handler yet: the default action, with nothing made so far
    before = log.split("stopping:", 1)[0]
    if fresh and "enrolled as" not in before:
        return "enrolling"
    if "meshd up:" not in before:
        return "bring-up"
    if "port map (" not in before:
        return "up, no port map yet"
    if "coordinator stream connected" not in before:
        return "mapped, stream not connected"
    return "steady"


# -- the module's lab ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    _show(request, f"stop test seed: MESHD_STOP_SEED={SEED} (repeats {REPEATS})")
    with Lab() as lab:
        mesh = Mesh(lab)
        try:
            mesh.start_coordinator(lab.server(name="coord"))
            beta = mesh.up(lab.host(nat="eim"), "beta", wait=False)
            ha, hg = lab.host(nat="upnp"), lab.host(nat="upnp", portmap=("upnp",))
            alpha, gamma = mesh.up(ha, "alpha", wait=False), mesh.up(hg, "gamma", wait=False)
            for n in (beta, alpha, gamma):
                mesh.wait_ready(n)
            policy = mesh.dir / "policy.toml"  # names must be enrolled before a policy can use them
            policy.write_text(POLICY)
            mesh.admin("policy", "set", str(policy))
            assert ha.router is not None and hg.router is not None
            w = World(lab, mesh, [(alpha, ha.router), (gamma, hg.router)], beta)
            for node, router in w.stopped:
                _baseline(w, node, router)
            yield w
            _report(request, w)
        finally:
            mesh.close()


def _baseline(world: World, node: Node, router: Router) -> None:
    """The world really has what the stops must remove (a peer, a port map, a firewall table), and a
    plain stop, the baseline every random stop is compared with, removes it all."""
    world.mesh.wait_peer(node, "beta", within=15)
    eventually(lambda: port_maps(world.lab, node, router), within=15, what=f"{node.name}'s port map")
    table = firewall.table_name(node.interface)
    eventually(
        lambda: node.host.run(["nft", "list", "table", "inet", table]).returncode == 0,
        within=10,
        what=f"{node.name}'s firewall table",
    )
    assert world.mesh.stop(node) == 0, node.log_tail()
    try:
        eventually(lambda: not leftovers(world, node, router), within=SETTLE)
    except EventuallyTimeout:
        pytest.fail(f"a plain stop left {leftovers(world, node, router)}:\n{node.log_tail()}")


def _report(request: pytest.FixtureRequest, world: World) -> None:
    lines = [f"stop times (seed {SEED}); limit {STOP_WITHIN:g} s"]
    for scenario, cycles in world.results.items():
        times = [c.stop_time for c in cycles if c.stop_time is not None]
        bad = sum(not c.ok for c in cycles)
        stats = f"max {max(times):.2f} s, median {statistics.median(times):.2f} s" if times else "no exits"
        lines.append(f"  {scenario:<16} {len(cycles)} stops: {stats}; {bad} bad")
    _show(request, "\n".join(lines))


def _show(request: pytest.FixtureRequest, text: str) -> None:
    """Print past pytest's capture: the stop-time figures are this test's output, even under -q."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n" + text, flush=True)


# -- one start/stop cycle ----------------------------------------------------------------------------------


def _wait_exit(proc: subprocess.Popen[bytes], t0: float, within: float) -> float | None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(max(0.0, t0 + within - time.monotonic()))
        return time.monotonic() - t0
    return None


def _stacks(pid: int) -> str:
    """The Python stacks of a meshd that does not stop, if py-spy is installed (PATH or MESHD_PY_SPY)."""
    spy = os.environ.get("MESHD_PY_SPY") or shutil.which("py-spy")
    if spy is None:
        return "(install py-spy to see where it hangs)"
    r = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    return r.stdout + r.stderr


def run_cycle(world: World, scenario: str, index: int, rng: random.Random) -> Cycle:
    target, coord = scenario.split("/")
    mesh = world.mesh
    node, router = world.stopped[index % len(world.stopped)]
    if mesh.coord_proc is None or mesh.coord_proc.poll() is not None:
        assert mesh.coord_host is not None
        mesh.start_coordinator(mesh.coord_host)
    fresh, band = rng.random() < FRESH, rng.random()
    if band < 0.2:  # from the spawn: python start-up (the race with the signal handlers)
        anchor, delay = "spawn", rng.uniform(0.0, 1.5)
    elif fresh and band < 0.5:  # keys made, enrolment under way (about 0.1 s)
        anchor, delay = "state dir made", rng.uniform(0.0, 0.15)
    elif band < 0.6:  # from meshd's first log line: bring-up, first map, punching, port maps (denser early)
        anchor, delay = "first log line", 1.2 * rng.random() ** 2
    else:  # from the spawn, later: steady state
        anchor, delay = "spawn", rng.uniform(1.5, MAX_DELAY)
    cycle = Cycle(scenario, index, node.name, delay, anchor, fresh=fresh)
    coord_at = rng.uniform(0.0, cycle.delay) if coord == "gone" else None
    log_start = node.log.stat().st_size if node.log.exists() else 0
    if cycle.fresh:  # a new identity (same name, so the policy applies): the stop may land in the enrolment
        mesh.admin("nodes", "remove", node.name, check=False)
        if node.state_dir.exists():  # (a fresh start stopped in python start-up made none)
            node.state_dir.rename(
                node.state_dir.with_name(f"{node.state_dir.name}-{scenario.replace('/', '-')}-{index}")
            )
    key = mesh.new_key() if cycle.fresh or node.name in world.unenrolled else None
    mesh.start(node, key=key)  # else the same state dir, enrolled before: no key
    proc = node.proc
    assert proc is not None
    if anchor != "spawn":
        reached: Callable[[], bool] = {
            "first log line": lambda: node.log.stat().st_size > log_start,
            "state dir made": lambda: (node.state_dir / "state.json").exists(),
        }[anchor]
        with contextlib.suppress(EventuallyTimeout):  # (it may exit first: the stop then finds it gone)
            eventually(lambda: proc.poll() is not None or reached(), within=STARTUP_WITHIN)
    started = time.monotonic()
    # The one deliberate sleep: the stop must land at a random moment of meshd's life.
    if coord_at is not None:
        time.sleep(coord_at)
        mesh.stop_coordinator()
    time.sleep(max(0.0, started + cycle.delay - time.monotonic()))

    t0 = time.monotonic()
    if proc.poll() is not None:
        cycle.exited_early = True
    if coord == "stopping" and mesh.coord_proc is not None:
        mesh.coord_proc.send_signal(signal.SIGTERM)
    if target == "group":
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    cycle.stop_time = _wait_exit(proc, t0, STOP_WITHIN)
    if cycle.stop_time is None:  # too slow: where is it stuck, how slow is it (evidence); then kill it
        cycle.stacks = _stacks(proc.pid)
        late = _wait_exit(proc, t0, 20.0)
        cycle.leftovers.append(f"meshd still running {STOP_WITHIN:g} s after SIGTERM (exited after {late})")
        if late is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    cycle.exit_code = proc.returncode
    if target == "group":
        with contextlib.suppress(EventuallyTimeout):
            eventually(lambda: not wireguard_go_pids(node.interface), within=STOP_WITHIN)
            cycle.group_time = time.monotonic() - t0
    if coord == "stopping":
        mesh.stop_coordinator()
    try:
        eventually(lambda: not leftovers(world, node, router), within=SETTLE)
    except EventuallyTimeout:
        cycle.leftovers += leftovers(world, node, router)
    with node.log.open("rb") as f:
        f.seek(log_start)
        cycle.log = f.read().decode(errors="replace")
    failed_at, stopped_at = cycle.log.find('msg="start-up failed'), cycle.log.find('msg="stopping: signal')
    cycle.failed_first = failed_at >= 0 and (stopped_at < 0 or failed_at < stopped_at)
    cycle.phase = (
        "exited before the signal"
        if cycle.exited_early
        else "failed before the signal"
        if cycle.failed_first
        else phase_of(cycle.log, cycle.fresh)
    )
    if "meshd up:" in cycle.log or "enrolled as" in cycle.log:
        world.unenrolled.discard(node.name)
    elif key is not None:
        world.unenrolled.add(node.name)  # stopped before it enrolled: the next start needs a key again
    if "Traceback" in cycle.log:
        cycle.leftovers.append("a traceback in meshd's log")
    # a loop that outlived its cancellation: bounded here, but it is how the stop used to hang for good
    # (and asyncio.run waits for it again, without a bound, at exit)
    cycle.leftovers += [
        "loop ignored its cancellation: " + line.split("msg=", 1)[-1]
        for line in cycle.log.splitlines()
        if "did not stop within" in line
    ]
    if cycle.leftovers:
        clean_up_after_failure(node)
    return cycle


SCENARIOS = [f"{t}/{c}" for t in ("meshd", "group") for c in ("up", "stopping", "gone")]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sigterm_stops_within_5s_and_leaves_nothing(
    request: pytest.FixtureRequest, world: World, scenario: str
) -> None:
    rng = random.Random(f"{SEED}/{scenario}")
    cycles = [run_cycle(world, scenario, i, rng) for i in range(REPEATS)]
    world.results[scenario] = cycles
    times = [c.stop_time for c in cycles if c.stop_time is not None]
    _show(
        request,
        f"{scenario}: {len(cycles)} stops, "
        + (f"max {max(times):.2f} s, median {statistics.median(times):.2f} s" if times else "none exited")
        + "".join(
            f"\n  #{c.index} {c.node}{' (new)' if c.fresh else ''}: signal {c.delay:.2f} s after {c.anchor}"
            f" ({c.phase}): "
            + (f"exit {c.exit_code} after {c.stop_time:.2f} s" if c.stop_time is not None else "did not exit")
            + (f", group gone after {c.group_time:.2f} s" if c.group_time is not None else "")
            + ("" if c.clean_exit else " NOT A CLEAN EXIT")
            + (f", LEFT {c.leftovers}" if c.leftovers else "")
            for c in cycles
        ),
    )
    bad = [c for c in cycles if not c.ok]
    report = "\n\n".join(
        f"cycle {c.index} ({c.node}): delay {c.delay:.2f} s ({c.phase}), stop {c.stop_time}, "
        f"exit {c.exit_code}, group {c.group_time}\n  left behind: {c.leftovers}\n  log:\n"
        + "\n".join("    " + line for line in c.log.splitlines()[-25:])
        + (f"\n  stacks {STOP_WITHIN:g} s after the signal:\n{c.stacks}" if c.stacks else "")
        for c in bad
    )
    assert not bad, f"seed {SEED}, {scenario}: {len(bad)} of {len(cycles)} stops failed\n{report}"
