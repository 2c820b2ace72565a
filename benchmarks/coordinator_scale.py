#!/usr/bin/env python3
"""Coordinator scale benchmark: simulated nodes speaking the real protocol over loopback.

Starts a real `coordinator serve` (SQLite, temp state dir, random loopback port), then in this process:

1. seeds N - K nodes straight into the database through the coordinator's own store code
   (coordinator.nodes.create_node, real keys and certificates) before the server starts, then enrolls
   the other K (--enroll-sample) through the real API with a reusable pre-auth key (proof of possession,
   real crypto; meshd's two requests over raw keep-alive HTTP/1.1, so the simulator's CPU stays small) ->
   enrollment rate, measured on the sample;
2. opens N signed map WebSockets and waits until every node has its first map -> connect time;
3. makes admin changes (`nodes rename` over the admin socket) and records, per node, when the delta
   naming the change arrives -> p50/p99/max from the admin call to the node, and to the LAST node;
4. samples the coordinator's RSS and CPU time from /proc.

Everything is bounded: --max-seconds for the whole run, per-phase timeouts, N <= 20000.

The simulated nodes are cheap so that the coordinator, not the simulator, is what is measured: one
process, each stream a bare asyncio protocol speaking just enough RFC 6455 (a signed upgrade request,
unmasked server frames, masked pongs and close replies) with no per-message task switch; each node
connects from its own loopback address group (127.0.x.y, 50 nodes per address) as nodes on many hosts
would. The JSON reports the simulator's own CPU seconds per phase next to the coordinator's.

    .venv/bin/python benchmarks/coordinator_scale.py --nodes 1000
    .venv/bin/python benchmarks/coordinator_scale.py --nodes 10000 --full-maps 200 --max-seconds 1500
    .venv/bin/python benchmarks/coordinator_scale.py --nodes 1000 --replicas 2 --postgres   # needs root

`--replicas N --postgres` (issue 16): the same measurements against N replicas on a throw-away
PostgreSQL (tests/coordinator/pg.py: fsync off) sharing their secrets (`--secrets-key-file`). The seeded
nodes go into that PostgreSQL database the same way (before any replica starts); node i enrolls and
streams to replica i mod N, changes are made on replica 0 (so the other nodes hear them through another
replica), the restart storm restarts every replica, RSS and CPU are replica 0's.

Streams ask for map format 2 (`?proto=2`); a long server message arrives as a binary frame of
zlib-compressed text: `full_map_bytes_per_node` and `full_map_wire_bytes_per_peer` count bytes on the
wire, `full_map_text_bytes_per_node` the inflated JSON text.

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
import re
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

from nacl.public import Box, PrivateKey, PublicKey

from coordinator.adminclient import AdminClient
from meshd import session
from meshd.control import ControlError, NodeKeys
from meshd.proto import netmap, signing
from meshd.proto.encoding import b64encode

BIN = Path(sys.executable).parent / "coordinator"


@dataclass
class SimNode:
    keys: NodeKeys
    node_id: int = 0
    name: str = ""
    got_map: float | None = None
    map_bytes: int = 0  #: the first message's bytes on the wire (WebSocket payload)
    map_text_bytes: int = 0  #: the same message as JSON text (a long one arrives zlib-compressed)
    received: dict[str, float] = field(default_factory=dict)  # new name -> arrival time
    messages: int = 0
    decode: bool = False
    version: int | None = None  #: the map version this node holds (read from each map/delta's text)
    streams: int = 0  #: streams opened (a reconnect after the restart opens another)
    resumed_with_map: int = 0  #: resumptions (since=V) answered with a full map


_DIGITS = re.compile(rb"\d+")


def version_of(data: bytes) -> int:
    """The version a map or delta message brings: its body's last "version" key (canonical JSON sorts the
    keys; "from_version" does not match, and no peer record has a "version" key)."""
    found = _DIGITS.match(data, data.rfind(b'"version":') + len(b'"version":'))
    assert found is not None, data[:60]
    return int(found.group())


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
    if not spy.exists():  # a venv that shares another's site-packages: py-spy is on PATH
        spy = Path(shutil.which("py-spy") or spy)
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


async def seed_nodes(
    state: Path, nodes: list[SimNode], user: str, extra: dict[str, object], batch: int = 1000
) -> float:
    """Enroll `nodes` straight into the database of the coordinator about to serve `state`, with the
    nodes' real public keys and through the coordinator's own store pieces: the address pool, the node
    certificate issuer (signed by its key), the map change log ("added" per node) and the audit trail (one
    record per batch); rows go in with one multi-row INSERT per batch. What enrollment commits, without
    the HTTP round trips, proof-of-possession checks and per-node name look-ups that the enrolled sample
    measures (create_node costs 15 ms a node here on a loaded machine: 10,000 would take minutes).
    `extra`: more Settings (--postgres: the database URL and the secrets key file the replicas use)."""
    from sqlalchemy import func, insert, select, text

    from coordinator.certs import issue_node_cert
    from coordinator.core import Core
    from coordinator.db.models import Meta, Node
    from coordinator.identity import create_user
    from coordinator.settings import Settings

    start = time.monotonic()
    core = Core(Settings(state_dir=state, stun_port=0, **extra))  # type: ignore[arg-type]
    await core.start()
    try:
        user_id = (await create_user(core, user, "admin")).id
        for first in range(0, len(nodes), batch):
            async with core.transaction() as tx:
                s = tx.session
                next_id = int((await s.execute(select(func.max(Node.id)))).scalar() or 0) + 1
                serial = await s.get(Meta, "cert_serial")
                if serial is None:
                    serial = Meta(key="cert_serial", value="0")
                    s.add(serial)
                now = time.time()
                rows = []
                for k, n in enumerate(nodes[first : first + batch]):
                    node_id, name = next_id + k, f"sim{first + k}"
                    ipv4, ipv6 = core.pool.allocate()
                    wg, node_key = b64encode(n.keys.wg_public), b64encode(n.keys.node_public)
                    cert, _ = issue_node_cert(
                        core.keys,
                        serial=int(serial.value) + k + 1,
                        name=name,
                        node_id=node_id,
                        ips=(f"{ipv4}/32", f"{ipv6}/128"),
                        wg_public_key=wg,
                        node_public_key=node_key,
                        tags=(),
                        now=now,
                        lifetime=core.settings.cert_lifetime,
                    )
                    rows.append(
                        {
                            "id": node_id,
                            "name": name,
                            "user_id": user_id,
                            "ipv4": ipv4,
                            "ipv6": ipv6,
                            "wg_public_key": wg,
                            "node_public_key": node_key,
                            "tags": "[]",
                            "endpoints": "[]",
                            "cert": cert,
                            "created_at": now,
                            "expired": False,
                            "ephemeral": False,
                        }
                    )
                    tx.change("added", node_id)
                    n.node_id, n.name = node_id, name
                await s.execute(insert(Node), rows)
                serial.value = str(int(serial.value) + len(rows))
                await tx.audit(
                    f"user:{user}",
                    "node.enrolled",
                    f"node:{rows[0]['name']}",
                    {"how": "benchmark seed", "nodes": len(rows), "last": rows[-1]["name"]},
                )
        if core.settings.database_url.startswith("postgresql"):  # explicit ids do not move the sequence
            async with core.transaction() as tx:
                await tx.session.execute(
                    text("SELECT setval(pg_get_serial_sequence('nodes', 'id'), (SELECT max(id) FROM nodes))")
                )
    finally:
        await core.stop()
    return time.monotonic() - start


def cpu_self() -> float:
    """CPU seconds (user + system) this simulator process used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RawHttp:
    """Just enough HTTP/1.1 for the enrollment requests (keep-alive, Content-Length bodies). The simulated
    nodes share the coordinator's cores: an httpx client cost more CPU per enrollment (5 ms) than the
    coordinator's whole enrollment path, so the client side is as small as the protocol allows."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(*self.addr)
        head = f"POST {path} HTTP/1.1\r\nhost: coordinator\r\ncontent-type: application/json\r\n"
        self.writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        length, close = 0, False
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            self.close()
        return int(status_line.split(b" ", 2)[1]), data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def enroll_one(http: RawHttp, keys: NodeKeys, hostname: str, key: str) -> tuple[int, str]:
    """One enrollment as meshd makes it (meshd.control.ControlClient.register): the challenge, a box of
    it from the WireGuard key, the node key's signature, the registration. (node id, name)."""
    status, data = await http.post("/api/v1/register/challenge")
    if status != 200:
        raise ControlError(f"challenge: coordinator said {status}: {data[:200]!r}", status)
    ch = json.loads(data)
    challenge = base64.b64decode(ch["challenge"])
    server = PublicKey(base64.b64decode(ch["server_ephemeral_x25519_pub"]))
    box = Box(PrivateKey(keys.wg_private), server).encrypt(challenge)
    sig = signing.sign_enrollment(keys.node_private, challenge, keys.wg_public, keys.node_public, hostname)
    body = {
        "hostname": hostname,
        "wg_public_key": b64encode(keys.wg_public),
        "node_public_key": b64encode(keys.node_public),
        "auth_key": key,
        "challenge": ch["challenge"],
        "signature": b64encode(sig),
        "box": b64encode(bytes(box)),
    }
    status, data = await http.post("/api/v1/register", json.dumps(body).encode())
    if status != 200:
        raise ControlError(f"register: coordinator said {status}: {data[:200]!r}", status)
    got = json.loads(data)
    return int(got["node_id"]), str(got["name"])


async def enroll_all(url: str, key: str, nodes: list[SimNode], concurrency: int) -> float:
    """`concurrency` workers, each one keep-alive HTTP connection reused for many nodes."""
    queue: asyncio.Queue[tuple[int, SimNode]] = asyncio.Queue()
    for item in enumerate(nodes):
        queue.put_nowait(item)

    async def worker(w: int) -> None:  # worker w enrolls through replica w mod N
        host, _, port = url_for(url, w).removeprefix("http://").rpartition(":")
        http = RawHttp((host, int(port)))
        try:
            while not queue.empty():
                i, n = queue.get_nowait()
                for attempt in range(3):  # a request that timed out on the loaded machine is tried again
                    try:
                        n.node_id, n.name = await asyncio.wait_for(
                            enroll_one(http, n.keys, f"enrolled{i}", key), 30
                        )
                        break
                    except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                        http.close()
                        if attempt == 2:
                            raise
                        RETRIES.append(f"{e!r}")
        finally:
            http.close()

    start = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return time.monotonic() - start


class HandshakeError(Exception):
    """The coordinator answered the upgrade request with an HTTP status other than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def source_address(i: int) -> str:
    """Node i's loopback source address: 50 nodes per address, as nodes behind a few NATs would be (the
    coordinator caps unauthenticated connections per source address)."""
    group = i // 50
    return f"127.0.{1 + group // 250}.{2 + group % 250}"


class LightStream(asyncio.Protocol):
    """One node's map stream, as little client work per message as the protocol allows.

    Speaks the client side of RFC 6455 for one upgrade: sends the signed request, reads the 101 answer,
    then parses unmasked server frames in `data_received` and handles each message inline (no queue, no
    task switch). Pings are answered with masked pongs and a close frame with a close reply."""

    def __init__(self, n: SimNode, since: int | None) -> None:
        loop = asyncio.get_running_loop()
        self.n = n
        self.since = since
        self.first: asyncio.Future[None] = loop.create_future()
        # retrieved here too: a stream whose waiter timed out still fails it later (no asyncio warning)
        self.first.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.closed: asyncio.Future[int | None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.parts: list[bytes] = []  #: fragments of a message sent in several frames
        self.opcode = 1  #: the message's opcode (its first fragment's: continuations carry 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first.done():
            self.first.set_exception(ConnectionError("closed before the first map"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = int(bytes(buf[9:12]))
            del buf[: end + 4]
            if status != 101:
                self.first.set_exception(HandshakeError(status))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if size - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            self.frame(b0 & 0x0F, bool(b0 & 0x80), payload)
        del buf[:pos]

    def send(self, opcode: int, payload: bytes) -> None:
        """A masked control frame (payloads < 126 bytes)."""
        mask = os.urandom(4)
        masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (0, 1, 2):
            if opcode:
                self.opcode = opcode
            self.parts.append(payload)
            if fin:
                message = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
                self.parts = []
                wire = len(message)
                if self.opcode == 2:  # a long message: zlib-compressed text (format 2)
                    message = netmap.inflate_frame(message).encode()
                self.message(message, wire)
        elif opcode == 8:  # close: answer it and report the code
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            self.send(8, payload[:2])
            if not self.closed.done():
                self.closed.set_result(code)
            assert self.transport is not None
            self.transport.close()
        elif opcode == 9:
            self.send(10, payload)

    def message(self, data: bytes, wire: int) -> None:
        n = self.n
        now = time.monotonic()
        if not self.first.done():
            n.got_map = now
            n.map_bytes = wire
            n.map_text_bytes = len(data)
            n.version = version_of(data)
            n.streams += 1
            # a resumed stream gets the delta since its version, or a full map when the coordinator
            # cannot build one
            is_map = data.startswith(b'{"type":"map"')
            if not (is_map or (self.since is not None and data.startswith(b'{"type":"delta"'))):
                self.first.set_exception(AssertionError(f"unexpected first message {data[:30]!r}"))
                return
            n.resumed_with_map += self.since is not None and is_map
            NEWEST[0] = max(NEWEST[0], n.version)
            self.first.set_result(None)
            return
        n.messages += 1
        if data.startswith((b'{"type":"map"', b'{"type":"delta"')):
            n.version = version_of(data)
            NEWEST[0] = max(NEWEST[0], n.version)
        if n.decode:  # a sample of nodes decodes everything (fails loudly on a bad delta)
            msg = netmap.decode_server_message(data.decode())
            if isinstance(msg, netmap.DeltaMessage):
                for p in msg.delta.peers_changed:
                    n.received.setdefault(p.name, now)
                if msg.delta.self_node is not None:
                    n.received.setdefault(msg.delta.self_node.name, now)
        elif EXPECTED and EXPECTED_BYTES[0] in data:
            n.received.setdefault(EXPECTED[0], now)


#: the newest map version any simulated node received: what a node resuming in the connect phase
#: claims (as a node that was connected a moment ago would), with the admin API's version as a floor
NEWEST = [0]
EXPECTED_BYTES: list[bytes] = [b""]  #: '"n":"<EXPECTED[0]>"' as bytes (format 2 peer records)


async def run_stream(
    addr: tuple[str, int], i: int, n: SimNode, ready: asyncio.Event, stop: asyncio.Event, since: int | None
) -> None:
    """Hold the node's stream; once it worked, reconnect as meshd does (meshd.session.Backoff: spread
    after a restart close, jittered doubling after failures) with since=<the version it holds>."""
    backoff = session.Backoff()
    while True:
        code: int | None = None
        streams = n.streams
        try:
            code = await hold_stream(addr, i, n, ready, since)
        except (OSError, TimeoutError, HandshakeError) as e:
            if stop.is_set() or n.version is None:
                raise
            code = e.status if isinstance(e, HandshakeError) else None
        if stop.is_set():
            return
        if n.version is None:
            raise ConnectionError(f"stream closed before its first map (close code {code})")
        if n.streams > streams:
            backoff.reset()
        await asyncio.sleep(backoff.next(code, MESH_SIZE[0]))
        since = n.version


LOAD = [0.0]  #: the 1-minute load average when the changes start (the machine is shared)
SEED_SECONDS = [0.0]
MESH_SIZE = [0]  #: nodes in the run (what a node's map tells meshd about the size of the herd)


async def hold_stream(
    addr: tuple[str, int], i: int, n: SimNode, ready: asyncio.Event, since: int | None
) -> int | None:
    """One stream until it closes; returns the close code (None: the connection was lost)."""
    path = f"/api/v1/stream?proto={netmap.MAP_FORMAT}" + (f"&since={since}" if since is not None else "")
    headers = signing.sign_request(n.keys.node_private, str(n.node_id), "GET", path, b"", time.time())
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    )
    loop = asyncio.get_running_loop()
    proto = LightStream(n, since)
    async with asyncio.timeout(120):
        transport, _ = await loop.create_connection(
            lambda: proto, addr[0], addr[1], local_addr=(source_address(i), 0)
        )
    try:
        transport.write(request.encode())
        async with asyncio.timeout(120):
            await proto.first
        ready.set()
        return await proto.closed
    finally:
        transport.close()


class Servers:
    """The coordinator process (`coordinator serve` on a fixed loopback port and state dir), restartable."""

    def __init__(self, state: Path, port: int, log: IO[str], extra: tuple[str, ...] = ()) -> None:
        self.cmd = [
            str(BIN), "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state), "--stun-port", "0",
            *extra,
        ]  # fmt: skip
        self.log = log
        self.port = port
        self.current = self._start()

    def _start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def stop(self) -> None:
        self.current.send_signal(signal.SIGTERM)
        self.wait()

    def wait(self) -> None:
        """Wait for the stopping process (a minute at most, then kill it)."""
        try:
            self.current.wait(60)
        except subprocess.TimeoutExpired:
            self.current.kill()
            self.current.wait()

    def restart(self) -> None:
        self.stop()
        self.current = self._start()


PORTS: list[int] = []  #: --replicas: every replica's port; node i uses PORTS[i % len(PORTS)]


def url_for(url: str, i: int) -> str:
    return f"http://127.0.0.1:{PORTS[i % len(PORTS)]}" if PORTS else url


def addr_for(addr: tuple[str, int], i: int) -> tuple[str, int]:
    return ("127.0.0.1", PORTS[i % len(PORTS)]) if PORTS else addr


class ReplicaSet(Servers):
    """--replicas N: N `coordinator serve` on one database; `current` and `port` are replica 0's (the
    admin socket, the RSS and CPU figures)."""

    def __init__(self, servers: list[Servers]) -> None:
        self.replicas = servers
        self.log = servers[0].log
        self.port = servers[0].port
        self.current = servers[0].current

    def stop(self) -> None:
        for r in self.replicas:
            r.current.send_signal(signal.SIGTERM)  # all at once, then wait for each
        for r in self.replicas:
            r.wait()

    def restart(self) -> None:
        self.stop()
        for r in self.replicas:
            r.current = r._start()
        self.current = self.replicas[0].current


async def until_listening(port: int, limit: float) -> float:
    """When (monotonic) the coordinator's port accepts connections again."""
    while time.monotonic() < limit:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return time.monotonic()
    return limit


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
    listening = asyncio.create_task(until_listening(servers.port, limit))
    while time.monotonic() < limit and any(  # noqa: ASYNC110 - bounded poll
        n.streams <= k for n, k in zip(nodes, opened, strict=True)
    ):
        await asyncio.sleep(0.1)
    back = [n.got_map - t0 for n, k in zip(nodes, opened, strict=True) if n.streams > k and n.got_map]
    t_listen = (await listening) - t0
    print(
        f"restart storm: coordinator stopped and started in {t_up:.1f} s, listening after {t_listen:.1f} s, "
        f"{len(back)}/{len(nodes)} streams back, "
        f"last after {max(back, default=0):.1f} s",
        flush=True,
    )
    return {
        "restart_storm_seconds": round(max(back), 1) if len(back) == len(nodes) else None,
        "restart_storm_streams_back": len(back),
        "restart_storm_p50_seconds": round(pct(back, 50), 1),
        "restart_coordinator_down_seconds": round(t_up, 1),
        "restart_full_maps": sum(n.resumed_with_map for n in nodes),
        # the new process's start (imports, migrations check, loading the nodes) until its port accepts,
        # from the restart; the storm proper is what comes after it
        "restart_listening_seconds": round(t_listen, 1),
        "restart_storm_after_listening_seconds": round(max(back) - t_listen, 1) if back else None,
    }


async def main_async(
    args: argparse.Namespace, servers: Servers, state: Path, url: str, nodes: list[SimNode], seeded: int
) -> dict[str, object]:
    server = servers.current
    deadline = time.monotonic() + args.max_seconds
    results: dict[str, object] = {"nodes": args.nodes + args.offline, "streams": args.nodes}
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    addr = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
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
        for other in PORTS[1:]:  # every replica listens before nodes enroll through it (a replica
            # that loads a large seeded map starts later than replica 0, whose admin socket answered)
            while True:
                try:
                    _r, w = await asyncio.open_connection("127.0.0.1", other)
                    w.close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"replica on port {other} did not start (see its log)") from None
                    await asyncio.sleep(0.2)
        if not seeded and not args.offline:  # seeding made the user
            admin.call("POST", "/admin/users", {"name": "bench"})
        key = admin.call("POST", "/admin/keys", {"user": "bench", "reusable": True, "expiration": 86400})[
            "key"
        ]
        rss0, cpu0 = proc_stats(server.pid)
        sample = nodes[seeded:]

        spy = start_py_spy(args.py_spy and args.py_spy + ".enroll", server.pid)
        sim_enroll0 = cpu_self()
        t_enroll = await asyncio.wait_for(
            enroll_all(url, key, sample, args.concurrency), deadline - time.monotonic()
        )
        stop_py_spy(spy, args.py_spy and args.py_spy + ".enroll")
        _rss1, cpu1 = proc_stats(server.pid)
        results["enroll_seconds"] = round(t_enroll, 2)
        results["enroll_per_second"] = round(len(sample) / t_enroll, 1) if sample else None
        results["enroll_server_cpu_seconds"] = round(cpu1 - cpu0, 2)
        results["enroll_simulator_cpu_seconds"] = round(cpu_self() - sim_enroll0, 2)
        results["load_average_1min_after_enroll"] = round(os.getloadavg()[0], 2)
        results["enroll_retries"] = len(RETRIES)
        results["enrolled_through_api"] = len(sample)
        results["seeded_nodes"] = seeded
        results["offline_nodes"] = args.offline
        results["seed_seconds"] = SEED_SECONDS[0]
        print(
            f"enrolled {len(sample)} nodes through the API in {t_enroll:.1f} s "
            f"({len(sample) / t_enroll:.0f}/s); {seeded} seeded in {SEED_SECONDS[0]:.1f} s",
            flush=True,
        )
        sim0 = cpu_self()

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
            since = None if i < args.full_maps else max(latest["version"], NEWEST[0])
            async with sem:
                task = asyncio.create_task(run_stream(addr_for(addr, i), i, n, ready, stop, since))
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
        peers = args.nodes + args.offline - 1
        results["full_map_wire_bytes_per_peer"] = round(nodes[0].map_bytes / max(1, peers), 1)
        results["connect_server_cpu_seconds"] = round(cpu2 - cpu1, 2)
        sim1 = cpu_self()
        results["connect_simulator_cpu_seconds"] = round(sim1 - sim0, 2)
        print(
            f"{args.nodes} streams open with full maps in {t_connect:.1f} s "
            f"({min(args.full_maps, args.nodes)} full maps of {nodes[0].map_bytes / 1024:.0f} KiB, "
            "the rest resumed with since=V)",
            flush=True,
        )
        await asyncio.sleep(1.5)  # let the online-flag deltas of the connect storm drain
        LOAD[0] = os.getloadavg()[0]

        spy = start_py_spy(args.py_spy, server.pid)
        lat_all: list[float] = []
        lat_last: list[float] = []
        for round_no in range(args.changes):
            target = nodes[round_no % len(nodes)]
            new_name = f"renamed{round_no}"
            EXPECTED[:] = [new_name]
            EXPECTED_BYTES[0] = f'"n":"{new_name}"'.encode()
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
        sim2 = cpu_self()
        results["changes_server_cpu_seconds"] = round(cpu3 - cpu2, 2)
        results["changes_simulator_cpu_seconds"] = round(sim2 - sim1, 2)
        results["load_average_before_changes"] = round(LOAD[0], 2)
        if args.storm_seconds > 0:
            results.update(await restart_storm(args, servers, nodes))
            results["restart_storm_simulator_cpu_seconds"] = round(cpu_self() - sim2, 2)
        results["load_average_1min_end"] = round(os.getloadavg()[0], 2)
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
    parser.add_argument(
        "--enroll-sample",
        type=int,
        default=500,
        metavar="K",
        help="enroll K nodes through the real API (the enrollment figures); seed the others straight into "
        "the database with the coordinator's store code before it starts (K >= --nodes: enroll all)",
    )
    parser.add_argument(
        "--offline",
        type=int,
        default=0,
        metavar="M",
        help="M more nodes seeded into the map that never connect (a mesh larger than one process's open "
        "file limit lets the coordinator hold streams for: every map counts them, no stream is theirs)",
    )
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
        "--replicas", type=int, default=1, help="coordinator replicas on one database (2 or more: --postgres)"
    )
    parser.add_argument(
        "--postgres", action="store_true", help="run on a throw-away PostgreSQL (needs root and postgresql)"
    )
    args = parser.parse_args()
    if not 1 <= args.nodes <= 20000:
        parser.error("--nodes must be between 1 and 20000")
    if not 1 <= args.replicas <= 4 or (args.replicas > 1 and not args.postgres):
        parser.error("--replicas must be 1 to 4, and more than 1 needs --postgres")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up the server on SIGTERM too
    # each process (this simulator, the coordinator, which inherits the limit) holds one descriptor per
    # stream plus some: raise the hard limit too where allowed (root); say so where it cannot be done
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.nodes * 2 + 1024
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        except (ValueError, OSError):
            if hard < args.nodes + 1024:
                parser.error(
                    f"--nodes {args.nodes} needs about {args.nodes + 1024} open files per process; the hard "
                    f"limit is {hard} (raise it: ulimit -Hn, LimitNOFILE=, or run as root)"
                )
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    state = Path(tempfile.mkdtemp(prefix=f"coordbench-{os.getpid()}-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(state.with_suffix(".log"), "w+")  # noqa: SIM115 - closed below
    MESH_SIZE[0] = args.nodes + args.offline
    results: dict[str, object] = {}
    nodes = [SimNode(NodeKeys.generate(), decode=i % 100 == 0) for i in range(args.nodes)]
    seeded = max(0, args.nodes - args.enroll_sample)
    offline = [SimNode(NodeKeys.generate()) for _ in range(args.offline)]  # in the map, never connected
    pg = contextlib.ExitStack()
    servers: Servers | None = None
    try:
        extra: tuple[str, ...] = ()
        settings: dict[str, object] = {}
        if args.postgres:
            from tests.coordinator import pg as pgtest

            if not pgtest.available():
                parser.error("--postgres needs root and Debian's postgresql package")
            key = state.with_suffix(".key")
            key.write_text(base64.b64encode(os.urandom(32)).decode())
            db = pgtest.create_database(pg.enter_context(pgtest.postgres_server()))
            extra = ("--database", db, "--secrets-key-file", str(key))
            settings = {"database": db, "secrets_key_file": key}
            results["replicas"] = args.replicas
        if seeded or offline:
            to_seed = nodes[:seeded] + offline
            SEED_SECONDS[0] = round(asyncio.run(seed_nodes(state, to_seed, "bench", settings)), 1)
            never = f"{len(offline)} never connect"
            print(f"seeded {len(to_seed)} nodes in {SEED_SECONDS[0]} s ({never})", flush=True)
        if args.replicas > 1:
            replicas = [Servers(state, port, log, extra)]
            PORTS.append(port)
            for r in range(1, args.replicas):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    other = s.getsockname()[1]
                replicas.append(Servers(Path(f"{state}-r{r}"), other, log, extra))
                PORTS.append(other)
            servers = ReplicaSet(replicas)
        else:
            servers = Servers(state, port, log, extra)
        results.update(
            asyncio.run(main_async(args, servers, state, f"http://127.0.0.1:{port}", nodes, seeded))
        )
    finally:
        if servers is not None:
            servers.stop()
        pg.close()
        for extra_state in state.parent.glob(f"{state.name}-r*"):
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
