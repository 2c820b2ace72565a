#!/usr/bin/env python3
"""Coordinator scale benchmark: simulated nodes speaking the real protocol over loopback.

Starts a real `coordinator serve` (SQLite, temp state dir, random loopback port), then in this process:

1. enrolls N nodes with a reusable pre-auth key (proof of possession, real crypto) -> enrollment rate;
2. opens N signed map WebSockets and waits until every node has its full map -> connect time;
3. makes admin changes (`nodes rename` over the admin socket) and records, per node, when the delta
   naming the change arrives -> p50/p99/max from the admin call to the node, and to the LAST node;
4. samples the coordinator's RSS and CPU time from /proc.

Everything is bounded: --max-seconds for the whole run, per-phase timeouts, N <= 20000.

    .venv/bin/python benchmarks/coordinator_scale.py --nodes 1000
    .venv/bin/python benchmarks/coordinator_scale.py --nodes 10000 --max-seconds 1500
    .venv/bin/python benchmarks/coordinator_scale.py --nodes 1000 --replicas 2 --postgres   # needs root

`--replicas 2 --postgres` (issue 16): the same measurements against two replicas on a throw-away
PostgreSQL (tests/coordinator/pg.py: fsync off) sharing their secrets (`--secrets-key-file`); node i
enrolls and streams to replica i mod 2, changes are made on replica 0 (so half the nodes hear them
through the other replica), the restart storm restarts every replica, RSS and CPU are replica 0's.

Simulated nodes keep the raw text of the full map (they do not build dataclasses for thousands of peers:
that is the daemon's cost, not the coordinator's); one node in 100 decodes every delta with
meshd.proto.netmap, the others look for the changed name in the raw text, so that the client side
(which shares this machine's cores with the coordinator) distorts the latency figures less.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.adminclient import AdminClient
from meshd import session
from meshd.control import ControlClient, ControlError, Enrollment, NodeKeys
from meshd.proto import netmap, signing

BIN = Path(sys.executable).parent / "coordinator"


@dataclass
class SimNode:
    keys: NodeKeys
    node_id: int = 0
    name: str = ""
    got_map: float | None = None
    map_bytes: int = 0  #: the first message's bytes on the wire (WebSocket payload)
    map_text_bytes: int = 0  #: the same message as JSON text
    received: dict[str, float] = field(default_factory=dict)  # new name -> arrival time
    messages: int = 0
    decode: bool = False
    version: int | None = None  #: the map version this node holds (read from each map/delta's text)
    streams: int = 0  #: streams opened (a reconnect after the restart opens another)
    resumed_with_map: int = 0  #: resumptions (since=V) answered with a full map


def version_of(text: str) -> int:
    """The version a map or delta message brings: its body's last "version" key (canonical JSON sorts the
    keys; "from_version" does not match, and no peer record has a "version" key)."""
    at = text.rfind('"version":') + len('"version":')
    end = at
    while text[end].isdigit():
        end += 1
    return int(text[at:end])


RETRIES: list[str] = []  #: enrollment requests that got no answer in time and were tried again
EXPECTED: list[str] = []  #: the name the current admin change introduces (others only search for it)


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS MiB, user+system CPU seconds) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks


def start_py_spy(path: str | None, pid: int) -> subprocess.Popen[bytes] | None:
    """Sample the coordinator with py-spy during the admin changes (collapsed stacks to `path`)."""
    if not path:
        return None
    spy = Path(sys.executable).parent / "py-spy"
    cmd = [
        str(spy),
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--rate",
        "250",
        "--gil",
        "--output",
        path,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the first change
    return proc


def stop_py_spy(proc: subprocess.Popen[bytes] | None, path: str | None) -> None:
    """Stop sampling and print the functions with the most samples of their own (self time)."""
    if proc is None or not path:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    own: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            leaf = stack.rsplit(";", 1)[-1]
            own[leaf] = own.get(leaf, 0) + int(count)
            total += int(count)
    for leaf, n in sorted(own.items(), key=lambda kv: -kv[1])[:15]:
        print(f"py-spy self {100 * n / max(total, 1):5.1f}%  {leaf[:150]}", flush=True)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def enroll_all(url: str, key: str, nodes: list[SimNode], concurrency: int) -> float:
    """`concurrency` workers, each one HTTP client reused for many nodes (only the keys change)."""
    queue: asyncio.Queue[tuple[int, SimNode]] = asyncio.Queue()
    for item in enumerate(nodes):
        queue.put_nowait(item)

    async def worker(w: int) -> None:
        async with ControlClient(url_for(url, w), NodeKeys.generate()) as client:
            while not queue.empty():
                i, n = queue.get_nowait()
                client.keys = n.keys
                for attempt in range(3):  # a request that timed out on the loaded machine is tried again
                    try:
                        result = await client.register(f"sim{i}", auth_key=key)
                        break
                    except ControlError as e:
                        if attempt == 2 or e.status:
                            raise
                        RETRIES.append(f"{e}")
                assert isinstance(result, Enrollment)
                n.node_id, n.name = result.node_id, result.name

    start = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return time.monotonic() - start


async def run_stream(
    url: str, n: SimNode, ready: asyncio.Event, stop: asyncio.Event, since: int | None = None
) -> None:
    """Hold the node's stream; once it worked, reconnect as meshd does (meshd.session.Backoff: spread
    after a restart close, jittered doubling after failures) with since=<the version it holds>."""
    from websockets.exceptions import ConnectionClosed, WebSocketException

    backoff = session.Backoff()
    while True:
        code: int | None = None
        streams = n.streams
        try:
            await hold_stream(url, n, ready, stop, since)
            return
        except ConnectionClosed as e:
            if stop.is_set() or n.version is None:
                raise
            code = e.rcvd.code if e.rcvd else None
        except (OSError, WebSocketException, TimeoutError, EOFError):  # as meshd's ControlError covers
            if stop.is_set() or n.version is None:
                raise
        if n.streams > streams:
            backoff.reset()
        await asyncio.sleep(backoff.next(code, MESH_SIZE[0]))
        since = n.version


MESH_SIZE = [0]  #: nodes in the run (what a node's map tells meshd about the size of the herd)


async def hold_stream(
    url: str, n: SimNode, ready: asyncio.Event, stop: asyncio.Event, since: int | None
) -> None:
    from websockets.asyncio.client import connect

    path = f"/api/v1/stream?proto={netmap.MAP_FORMAT}" + (f"&since={since}" if since is not None else "")
    headers = signing.sign_request(n.keys.node_private, str(n.node_id), "GET", path, b"", time.time())
    async with connect(
        "ws" + url[4:] + path,
        additional_headers=headers,
        max_size=None,
        compression=None,
        open_timeout=120,
        ping_interval=None,
    ) as ws:
        first = await ws.recv()
        n.got_map = time.monotonic()
        n.map_bytes = len(first)  # on the wire: a long message is a zlib binary frame
        if isinstance(first, bytes):
            first = netmap.inflate_frame(first)
        n.map_text_bytes = len(first)
        n.version = version_of(first)
        n.streams += 1
        kind = first[:20]
        del first  # a full map can be megabytes; keep only its size
        # a resumed stream gets the delta since its version, or a full map when the coordinator cannot
        # build one (after a restart it sends full maps: its in-memory online flags start over)
        assert kind.startswith('{"type":"map"' if since is None else ('{"type":"delta"', '{"type":"map"')), (
            kind
        )
        n.resumed_with_map += since is not None and kind.startswith('{"type":"map"')
        ready.set()
        async for text in ws:  # the task is cancelled at the end of the run
            if isinstance(text, bytes):
                text = netmap.inflate_frame(text)
            now = time.monotonic()
            n.messages += 1
            if text.startswith(('{"type":"map"', '{"type":"delta"')):
                n.version = version_of(text)
            if n.decode:  # a sample of nodes decodes everything (fails loudly on a bad delta)
                msg = netmap.decode_server_message(text)
                if isinstance(msg, netmap.DeltaMessage):
                    for p in msg.delta.peers_changed:
                        n.received.setdefault(p.name, now)
                    if msg.delta.self_node is not None:
                        n.received.setdefault(msg.delta.self_node.name, now)
            elif EXPECTED and f'"n":"{EXPECTED[0]}"' in text:
                n.received.setdefault(EXPECTED[0], now)


class Servers:
    """The coordinator process (`coordinator serve` on a fixed loopback port and state dir), restartable."""

    def __init__(self, state: Path, port: int, log: IO[str], extra: tuple[str, ...] = ()) -> None:
        self.cmd = [
            str(BIN), "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state), "--stun-port", "0",
            *extra,
        ]  # fmt: skip
        self.log = log
        self.current = self._start()

    def _start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def stop(self) -> None:
        self.current.send_signal(signal.SIGTERM)
        try:
            self.current.wait(60)
        except subprocess.TimeoutExpired:
            self.current.kill()
            self.current.wait()

    def restart(self) -> None:
        self.stop()
        self.current = self._start()


URLS: list[str] = []  #: --replicas: every replica's URL; node i uses URLS[i % len(URLS)]


def url_for(url: str, i: int) -> str:
    return URLS[i % len(URLS)] if URLS else url


class ReplicaSet(Servers):
    """--replicas N: N `coordinator serve` on one database; `current` is replica 0 (admin, figures)."""

    def __init__(self, servers: list[Servers]) -> None:
        self.replicas = servers
        self.log = servers[0].log
        self.current = servers[0].current

    def stop(self) -> None:
        for r in self.replicas:
            r.current.send_signal(signal.SIGTERM)  # all at once, then wait for each
        for r in self.replicas:
            r.stop()

    def restart(self) -> None:
        self.stop()
        for r in self.replicas:
            r.current = r._start()
        self.current = self.replicas[0].current


async def restart_storm(
    args: argparse.Namespace, servers: Servers, nodes: list[SimNode]
) -> dict[str, object]:
    """Restart the coordinator under every connected node; time until every node has a stream again and
    the map it resumed (a delta since its version, or a full map) arrived."""
    opened = [n.streams for n in nodes]
    t0 = time.monotonic()
    await asyncio.to_thread(servers.restart)
    t_up = time.monotonic() - t0
    limit = t0 + args.storm_seconds
    while time.monotonic() < limit and any(  # noqa: ASYNC110 - bounded poll
        n.streams <= k for n, k in zip(nodes, opened, strict=True)
    ):
        await asyncio.sleep(0.1)
    back = [n.got_map - t0 for n, k in zip(nodes, opened, strict=True) if n.streams > k and n.got_map]
    print(
        f"restart storm: coordinator back in {t_up:.1f} s, {len(back)}/{len(nodes)} streams back, "
        f"last after {max(back, default=0):.1f} s",
        flush=True,
    )
    return {
        "restart_storm_seconds": round(max(back), 1) if len(back) == len(nodes) else None,
        "restart_storm_streams_back": len(back),
        "restart_storm_p50_seconds": round(pct(back, 50), 1),
        "restart_coordinator_down_seconds": round(t_up, 1),
        "restart_full_maps": sum(n.resumed_with_map for n in nodes),
    }


async def main_async(args: argparse.Namespace, servers: Servers, state: Path, url: str) -> dict[str, object]:
    server = servers.current
    deadline = time.monotonic() + args.max_seconds
    results: dict[str, object] = {"nodes": args.nodes}
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    try:
        admin = AdminClient(state / "admin.sock")
        while True:
            try:
                admin.call("GET", "/admin/users")
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("coordinator did not start (see its log)") from None
                await asyncio.sleep(0.1)
        admin.call("POST", "/admin/users", {"name": "bench"})
        key = admin.call("POST", "/admin/keys", {"user": "bench", "reusable": True, "expiration": 86400})[
            "key"
        ]
        rss0, cpu0 = proc_stats(server.pid)

        nodes = [SimNode(NodeKeys.generate(), decode=i % 100 == 0) for i in range(args.nodes)]
        spy = start_py_spy(args.py_spy and args.py_spy + ".enroll", server.pid)
        t_enroll = await asyncio.wait_for(
            enroll_all(url, key, nodes, args.concurrency), deadline - time.monotonic()
        )
        stop_py_spy(spy, args.py_spy and args.py_spy + ".enroll")
        _rss1, cpu1 = proc_stats(server.pid)
        results["enroll_seconds"] = round(t_enroll, 2)
        results["enroll_per_second"] = round(args.nodes / t_enroll, 1)
        results["enroll_server_cpu_seconds"] = round(cpu1 - cpu0, 2)
        results["enroll_retries"] = len(RETRIES)
        print(f"enrolled {args.nodes} nodes in {t_enroll:.1f} s ({args.nodes / t_enroll:.0f}/s)", flush=True)

        start = time.monotonic()
        sem = asyncio.Semaphore(args.concurrency)

        latest = {"version": int((await asyncio.to_thread(admin.call, "GET", "/healthz"))["map_version"])}

        async def follow_version() -> None:  # resuming nodes claim the version they would have seen last
            while True:
                await asyncio.sleep(0.5)
                health = await asyncio.to_thread(admin.call, "GET", "/healthz")
                latest["version"] = int(health["map_version"])

        follower = asyncio.create_task(follow_version())

        async def connect(i: int, n: SimNode) -> None:
            ready = asyncio.Event()
            since = None if i < args.full_maps else latest["version"]
            async with sem:
                task = asyncio.create_task(run_stream(url_for(url, i), n, ready, stop, since))
                tasks.append(task)
                waiter = asyncio.ensure_future(ready.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    task.result()

        try:
            await asyncio.wait_for(
                asyncio.gather(*(connect(i, n) for i, n in enumerate(nodes))), deadline - time.monotonic()
            )
        finally:
            follower.cancel()
        t_connect = time.monotonic() - start
        rss2, cpu2 = proc_stats(server.pid)
        results["connect_all_seconds"] = round(t_connect, 2)
        results["full_maps_sent"] = min(args.full_maps, args.nodes)
        results["full_map_bytes_per_node"] = nodes[0].map_bytes
        results["full_map_text_bytes_per_node"] = nodes[0].map_text_bytes
        results["full_map_wire_bytes_per_peer"] = round(nodes[0].map_bytes / max(1, args.nodes - 1), 1)
        results["connect_server_cpu_seconds"] = round(cpu2 - cpu1, 2)
        print(
            f"{args.nodes} streams open with full maps in {t_connect:.1f} s "
            f"({min(args.full_maps, args.nodes)} full maps of {nodes[0].map_bytes / 1024:.0f} KiB, "
            "the rest resumed with since=V)",
            flush=True,
        )
        await asyncio.sleep(1.5)  # let the online-flag deltas of the connect storm drain

        spy = start_py_spy(args.py_spy, server.pid)
        lat_all: list[float] = []
        lat_last: list[float] = []
        for round_no in range(args.changes):
            target = nodes[round_no % len(nodes)]
            new_name = f"renamed{round_no}"
            EXPECTED[:] = [new_name]
            t0 = time.monotonic()
            await asyncio.to_thread(
                admin.call, "POST", f"/admin/nodes/{target.name}/rename", {"new_name": new_name}
            )
            target.name = new_name
            wait_until = time.monotonic() + 30
            while time.monotonic() < wait_until and not all(new_name in n.received for n in nodes):  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # bounded poll: 30 s
            arrivals = [n.received[new_name] - t0 for n in nodes if new_name in n.received]
            missing = len(nodes) - len(arrivals)
            lat_all.extend(arrivals)
            if arrivals:
                lat_last.append(max(arrivals))
            print(
                f"change {round_no}: {len(arrivals)} nodes, p50 {pct(arrivals, 50) * 1000:.0f} ms, "
                f"p99 {pct(arrivals, 99) * 1000:.0f} ms, last {max(arrivals, default=0) * 1000:.0f} ms"
                + (f", {missing} MISSING" if missing else ""),
                flush=True,
            )
            await asyncio.sleep(0.3)
        stop_py_spy(spy, args.py_spy)
        rss3, cpu3 = proc_stats(server.pid)
        results["change_to_node_p50_ms"] = round(pct(lat_all, 50) * 1000, 1)
        results["change_to_node_p99_ms"] = round(pct(lat_all, 99) * 1000, 1)
        results["change_to_last_node_median_ms"] = (
            round(statistics.median(lat_last) * 1000, 1) if lat_last else None
        )
        results["change_to_last_node_max_ms"] = round(max(lat_last) * 1000, 1) if lat_last else None
        results["server_rss_mib_idle"] = round(rss0, 1)
        results["server_rss_mib_connected"] = round(max(rss2, rss3), 1)
        results["server_cpu_seconds_total"] = round(cpu3 - cpu0, 1)
        if args.storm_seconds > 0:
            results.update(await restart_storm(args, servers, nodes))
        return results
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument(
        "--full-maps",
        type=int,
        default=1_000_000,
        help="only the first K nodes fetch a full map; the others resume with since=<current version> "
        "(a full mesh map is O(N) per node, O(N^2) in total: 78 GB at 10,000 nodes)",
    )
    parser.add_argument(
        "--py-spy", metavar="FILE", help="sample the coordinator with py-spy during the changes (raw stacks)"
    )
    parser.add_argument(
        "--storm-seconds",
        type=float,
        default=120,
        help="restart the coordinator under all streams and wait this long for them all to be back "
        "(0: no restart)",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="coordinator replicas (2 or more: --postgres)"
    )
    parser.add_argument("--postgres", action="store_true", help="a throw-away PostgreSQL (needs root)")
    args = parser.parse_args()
    if not 1 <= args.nodes <= 20000:
        parser.error("--nodes must be between 1 and 20000")
    if not 1 <= args.replicas <= 4 or (args.replicas > 1 and not args.postgres):
        parser.error("--replicas must be 1 to 4, and more than 1 needs --postgres")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up the server on SIGTERM too
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, args.nodes * 2 + 1024)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the coordinator
    state = Path(tempfile.mkdtemp(prefix=f"coordbench-{os.getpid()}-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(state.with_suffix(".log"), "w+")  # noqa: SIM115 - closed below
    MESH_SIZE[0] = args.nodes
    results: dict[str, object] = {}
    pg = contextlib.ExitStack()
    if args.postgres:
        from tests.coordinator import pg as pgtest

        if not pgtest.available():
            parser.error("--postgres needs root and Debian's postgresql package")
        key = state.with_suffix(".key")
        key.write_text(base64.b64encode(os.urandom(32)).decode())
        db = pgtest.create_database(pg.enter_context(pgtest.postgres_server()))
        extra: tuple[str, ...] = ("--database", db)
        extra += ("--secrets-key-file", str(key))
        replicas = [Servers(state, port, log, extra)]
        for r in range(1, args.replicas):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                other = s.getsockname()[1]
            replicas.append(Servers(Path(f"{state}-r{r}"), other, log, extra))
            URLS.append(f"http://127.0.0.1:{other}")
        if URLS:
            URLS.insert(0, f"http://127.0.0.1:{port}")
        servers: Servers = ReplicaSet(replicas)
        results["replicas"] = args.replicas
    else:
        servers = Servers(state, port, log)
    try:
        results.update(asyncio.run(main_async(args, servers, state, f"http://127.0.0.1:{port}")))
    finally:
        servers.stop()
        pg.close()
        for extra_state in Path(state).parent.glob(f"{state.name}-r*"):
            shutil.rmtree(extra_state, ignore_errors=True)
        state.with_suffix(".key").unlink(missing_ok=True)
        log.seek(0)
        lines = log.read().splitlines()
        errors = [line for line in lines if "Traceback" in line or "ERROR" in line or "Error" in line]
        for line in sorted(set(errors))[:8]:
            print(f"server log: {line[:200]}", file=sys.stderr)
        log.close()
        if errors:
            print(f"server log kept: {log.name}", file=sys.stderr)
        else:
            os.unlink(log.name)
        shutil.rmtree(state, ignore_errors=True)
    results["server_errors_logged"] = len(errors)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
