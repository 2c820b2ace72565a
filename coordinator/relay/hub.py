"""Relay hub: clients by WireGuard key, SEND_PACKET -> RECV_PACKET routing, bounded per-client queues.

Transport-independent: a :class:`ClientConn` subclass (raw TCP after HTTP Upgrade, or WebSocket) feeds
received bytes to :meth:`ClientConn.feed` and implements ``_write``/``_close``. Each connection owns a
bounded queue used while its transport is paused (its socket buffer is full): when the queue is full
the OLDEST frame is dropped and counted, so a slow client never stalls the sender or anyone else.

Memory per client is bounded in bytes: the transport buffer up to WRITE_HIGH (256 KiB) plus one batch,
then the queue up to QUEUE_BYTES (1 MiB) of frames no larger than relay.MAX_PACKET + 37 bytes each. N
clients that never read cost the relay about N x 1.3 MiB (tests/hostile/test_relay_memory.py).

The data path (issue 14): each read is split by :class:`meshd.proto.relaystream.PacketStream`, so a packet
is a memoryview into the bytes read (no copy, no frame object); the RECV_PACKET frames a read yields for
one client are handed to its transport as one ``writelines`` (one send for up to BATCH frames, not one
per packet), and the counters are updated once per read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from meshd.proto import relay, relayfeed, relayport
from meshd.proto.relay import FrameType, RelayProtocolError
from meshd.proto.relayfeed import SessionRecord
from meshd.proto.relaystream import PacketStream
from meshd.proto.ticket import TicketError, TicketPayload

if TYPE_CHECKING:
    from coordinator.relay.udp import UdpPorts

log = logging.getLogger("coordinator.relay")

#: Bytes of frames held per client while its transport is paused (then drop oldest)
QUEUE_BYTES = relay.QUEUE_BYTES
#: Frames held per client at most, as well: a queue of tiny frames costs ~100 bytes of Python objects
#: each, far more than its byte count (and the WebSocket writer bounds its queue by this count).
QUEUE_FRAMES = 1024
WRITE_HIGH = relay.WRITE_HIGH  #: asyncio transport buffer above which a client counts as slow
KEEPALIVE = 20.0
#: A connection that has not sent a valid CLIENT_HELLO by then is closed: unauthenticated connections
#: must not pile up (``conns`` would grow with every idle socket someone opens).
HELLO_TIMEOUT = 10.0
HOLD_SECONDS = 3.0  #: how long a packet for a node that is not connected yet is kept
HOLD_PER_PEER = 8
HOLD_TOTAL = 4096
HOLD_MAX_BYTES = 256  #: WireGuard handshake messages are 148, 92 and 64 bytes
_RECV_HDR = relay.HEADER
_RECV = FrameType.RECV_PACKET
#: RECV_PACKET frames written to one client at once at most (~48 KiB at full size): a batch may take the
#: transport buffer this far past WRITE_HIGH before the client counts as slow
BATCH = 32
Parts = list[bytes | memoryview]  #: frames as (header + key, packet) pairs of parts


class RelayMetrics:
    """Prometheus metrics per region (registered on the coordinator's or the standalone relay's registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.clients = Gauge("relay_clients", "Connected relay clients", ["region"], registry=registry)
        self.packets = Counter("relay_packets", "Packets relayed", ["region"], registry=registry)
        self.bytes = Counter("relay_bytes", "Packet bytes relayed", ["region"], registry=registry)
        self.drops = Counter(
            "relay_drops",
            "Packets dropped (queue full: drop oldest; or unknown peer)",
            ["region", "reason"],
            registry=registry,
        )
        self.closed = Counter(
            "relay_protocol_errors",
            "Connections closed for breaking the framing",
            ["region"],
            registry=registry,
        )
        self.udp_allocations = Gauge(
            "relay_udp_allocations", "UDP relay port pairs allocated", ["region"], registry=registry
        )
        self.udp_bytes = Counter(
            "relay_udp_bytes", "Packet bytes forwarded between UDP relay ports", ["region"], registry=registry
        )


class ClientConn:
    """One client connection; subclasses provide the transport."""

    transport_name = "?"

    def __init__(self, hub: RelayHub, peer: str) -> None:
        self.hub = hub
        self.peer = peer  #: remote address for logs
        self.key: bytes | None = None
        #: fresh per connection: the client's hellos must be signed over it (a captured hello is useless)
        self.challenge = relay.Challenge(hub.region_id, os.urandom(relay.NONCE_LEN))
        self.node_id = -1
        self.home = False
        self.not_after = 0.0
        self.decoder = PacketStream(FrameType.SEND_PACKET)
        #: frames waiting while the transport is paused: at most QUEUE_FRAMES and QUEUE_BYTES (``queued``
        #: is their size), then the oldest is dropped
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.paused = False
        self.closed = False
        self.opened = time.time()
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.drops = 0

    # -- transport side ------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _close_transport(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """The transport is ready: the relay speaks first, with this connection's challenge."""
        self.hub.add(self)
        self._write(relay.challenge(self.challenge))

    def feed(self, data: bytes) -> None:
        """Bytes from the client: decode and act; a protocol error closes this connection only."""
        if self.closed:
            return
        batches: dict[ClientConn, Parts] = {}
        try:
            for item in self.decoder.feed(data):
                if type(item) is tuple:
                    self._packet(item[0], item[1], batches)
                else:
                    assert isinstance(item, relay.Frame)
                    self._frame(item)
                if self.closed:
                    break
        except RelayProtocolError as exc:
            self.hub.metrics.closed.labels(self.hub.region).inc()
            self.close(f"protocol error: {exc}", tell=True)
        except TicketError as exc:
            self.close(f"refused: {exc}", tell=True)
        finally:
            for target, parts in batches.items():
                if parts:
                    target.send_parts(parts)

    def eof(self) -> None:
        try:
            self.decoder.eof()
        except RelayProtocolError as exc:
            self.close(f"protocol error: {exc}")
            return
        self.close("client closed")

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        q = self.queue
        while q and not self.paused and not self.closed:
            data = q.popleft()
            self.queued -= len(data)
            self._write(data)

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.paused:
            self._write(data)
            return
        q = self.queue
        q.append(data)
        self.queued += len(data)
        while len(q) > QUEUE_FRAMES or self.queued > QUEUE_BYTES:
            self.queued -= len(q.popleft())
            self.drops += 1
            self.hub.metrics.drops.labels(self.hub.region, "queue").inc()

    def send_parts(self, parts: Parts) -> None:
        """Several frames at once, each as two parts (header + key, packet): one write while the
        transport takes them, else frame by frame into the bounded queue."""
        if self.closed:
            return
        if not self.paused:
            self._write_parts(parts)
            return
        for i in range(0, len(parts), 2):
            self.send(b"".join((parts[i], parts[i + 1])))

    def _write_parts(self, parts: Parts) -> None:
        self._write(b"".join(parts))

    def close(self, reason: str, tell: bool = False) -> None:
        if self.closed:
            return
        if tell:
            with contextlib.suppress(Exception):  # the transport may already be gone
                self._write(relay.encode(FrameType.CLOSE, reason.encode()[:1024]))
        self.closed = True
        self.queue.clear()
        self.queued = 0
        self.hub.unregister(self, reason)
        self._close_transport()

    # -- frames --------------------------------------------------------------------------------------
    def _packet(self, dst: bytes, packet: memoryview, batches: dict[ClientConn, Parts]) -> None:
        """SEND_PACKET: onto the batch for its destination (written when the read is done, or at BATCH)."""
        if self.key is None:
            raise RelayProtocolError("SEND_PACKET before CLIENT_HELLO")
        n = len(packet)
        self.rx_bytes += n
        hub = self.hub
        target = hub.clients.get(dst)
        if target is None:
            if not hub.hold(dst, self.key, bytes(packet)):
                hub.metrics.drops.labels(hub.region, "no_peer").inc()
            self.send(relay.peer_gone(dst))
            return
        target.tx_bytes += n
        parts = batches.get(target)
        if parts is None:
            parts = batches[target] = []
        parts.append(_RECV_HDR.pack(_RECV, relay.KEY_LEN + n) + self.key)
        parts.append(packet)
        if len(parts) >= 2 * BATCH:
            target.send_parts(parts)
            batches[target] = []
        hub.count(n)

    def _frame(self, frame: relay.Frame) -> None:
        t = frame.type
        if t == FrameType.SEND_PACKET:  # PacketStream hands these to _packet: never here
            raise RelayProtocolError("SEND_PACKET outside the data path")
        elif t == FrameType.CLIENT_HELLO:
            self.hub.hello(self, relay.parse_hello(frame))
        elif self.key is None:
            raise RelayProtocolError(f"{t.name} before CLIENT_HELLO")
        elif t == FrameType.PING:
            self.hub.pong(self, frame.payload)
        elif t == FrameType.PORT_REQUEST:
            if self.hub.ports is None:
                raise RelayProtocolError("PORT_REQUEST: this relay serves no UDP ports")
            self.hub.ports.request(self, relayport.decode_request(frame.payload))
        elif t in (FrameType.KEEPALIVE, FrameType.PONG):
            pass
        elif t == FrameType.CLOSE:
            self.close("client said close: " + frame.payload.decode("utf-8", "replace"))
        else:
            raise RelayProtocolError(f"{t.name} is not a client frame")


class RelayHub:
    """Clients by key for one region. ``verify`` checks a ticket and that its node may use the relay."""

    def __init__(
        self,
        region: str,
        region_id: int,
        verify: Callable[[bytes, float], TicketPayload],
        metrics: RelayMetrics,
        *,
        on_session: Callable[[SessionRecord], None] | None = None,
        on_open: Callable[[ClientConn], None] | None = None,
        on_home: Callable[[ClientConn], None] | None = None,
        pong_delay: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < len(region) <= relay.MAX_REGION_NAME or not 0 <= region_id < 1 << 31:
            # clients would refuse its SERVER_HELLO: say so at startup, not to every client
            raise ValueError(f"relay region: name of 1 to {relay.MAX_REGION_NAME} characters, id below 2^31")
        self.region = region
        self.region_id = region_id
        self.verify = verify
        self.metrics = metrics
        self.on_session = on_session
        self.on_open = on_open
        self.on_home = on_home
        #: TEST-ONLY knob: answer PINGs this much later, so a lab can make one region measurably "far"
        #: (tc netem is not available on the test machine). Zero in production.
        self.pong_delay = pong_delay
        self.clock = clock
        self.clients: dict[bytes, ClientConn] = {}
        self.conns: set[ClientConn] = set()
        #: small packets for nodes not connected yet: HOLD_PER_PEER each, HOLD_TOTAL in all, HOLD_SECONDS long
        self._held: dict[bytes, deque[tuple[float, bytes, bytes]]] = {}
        self._held_total = 0
        self._packets = 0
        self._bytes = 0
        #: UDP relay ports (coordinator/relay/udp.py), when this region serves them
        self.ports: UdpPorts | None = None

    def hold(self, dst: bytes, src: bytes, packet: bytes) -> bool:
        """Keep a small packet for a node that is not connected (yet) for a moment; True if kept.

        Two daemons that start together reach the relay a few hundred ms apart; the first one's
        WireGuard handshake would be lost and WireGuard waits REKEY_TIMEOUT (5 s) before trying again.
        Handshake messages are small (148/92/64 bytes), so only small packets are held: at most
        HOLD_PER_PEER per destination, HOLD_TOTAL in all, for HOLD_SECONDS.
        """
        if len(packet) > HOLD_MAX_BYTES or self._held_total >= HOLD_TOTAL:
            return False
        now = self.clock()
        queue = self._held.setdefault(dst, deque())
        while queue and now - queue[0][0] > HOLD_SECONDS:
            queue.popleft()
            self._held_total -= 1
        if len(queue) >= HOLD_PER_PEER:
            queue.popleft()
            self._held_total -= 1
        queue.append((now, src, packet))
        self._held_total += 1
        return True

    def _deliver_held(self, conn: ClientConn) -> None:
        assert conn.key is not None
        queue = self._held.pop(conn.key, None)
        if not queue:
            return
        now = self.clock()
        self._held_total -= len(queue)
        for at, src, packet in queue:
            if now - at <= HOLD_SECONDS:
                conn.send(relay.recv_packet(src, packet))

    def _expire_held(self) -> None:
        now = self.clock()
        for dst in list(self._held):
            queue = self._held[dst]
            while queue and now - queue[0][0] > HOLD_SECONDS:
                queue.popleft()
                self._held_total -= 1
            if not queue:
                del self._held[dst]

    def count(self, n: int) -> None:
        self._packets += 1
        self._bytes += n
        if self._packets >= 256:
            self.flush_counts()

    def flush_counts(self) -> None:
        """Prometheus counters are updated in batches (a lock per packet costs ~10% throughput)."""
        if self._packets:
            self.metrics.packets.labels(self.region).inc(self._packets)
            self.metrics.bytes.labels(self.region).inc(self._bytes)
            self._packets = self._bytes = 0

    def add(self, conn: ClientConn) -> None:
        self.conns.add(conn)

    def hello(self, conn: ClientConn, hello: relay.ClientHello) -> None:
        """Admit (or renew) a client: the ticket verifies (``verify``: signature, validity, node still
        allowed, WireGuard key still current), names this region and the hello's key, and the hello is
        signed by the ticket's node key over this connection's challenge. Anything else: TicketError."""
        now = self.clock()
        payload = self.verify(hello.ticket, now)
        if payload.region_id != self.region_id:
            raise TicketError(f"the ticket is for relay region {payload.region_id}, not {self.region_id}")
        if payload.key != hello.key:
            raise TicketError("the ticket is for another WireGuard key")
        if not relay.hello_signed_by(payload.node_key, conn.challenge, hello):
            raise TicketError("the hello is not signed by the ticket's node key over this challenge")
        if conn.key is not None:  # renewal over the open connection
            if hello.key != conn.key or payload.node_id != conn.node_id:
                raise TicketError("a renewed ticket must keep the connection's node and key")
            conn.not_after = payload.not_after
            if hello.home and not conn.home:  # the client chose this region as home after probing
                conn.home = True
                if self.on_home is not None:
                    self.on_home(conn)
            return
        conn.key = hello.key
        conn.node_id = payload.node_id
        conn.home = hello.home
        conn.not_after = payload.not_after
        old = self.clients.get(hello.key)
        self.clients[hello.key] = conn
        if old is not None and old is not conn:
            old.close("replaced by a newer connection of the same node", tell=True)
        self.metrics.clients.labels(self.region).set(len(self.clients))
        hello_back = relay.ServerHello(self.region, self.region_id, KEEPALIVE, self.ports is not None)
        conn.send(relay.server_hello(hello_back))
        log.info("relay session open: node %d (%s) from %s", conn.node_id, conn.transport_name, conn.peer)
        if self.on_open is not None:
            self.on_open(conn)
        self._deliver_held(conn)

    def pong(self, conn: ClientConn, data: bytes) -> None:
        frame = relay.encode(FrameType.PONG, data)
        if self.pong_delay > 0:
            asyncio.get_running_loop().call_later(self.pong_delay, conn.send, frame)
        else:
            conn.send(frame)

    def unregister(self, conn: ClientConn, reason: str) -> None:
        self.conns.discard(conn)
        if conn.key is None:
            log.info("relay connection from %s closed before hello: %s", conn.peer, reason)
            return
        if self.clients.get(conn.key) is conn:
            del self.clients[conn.key]
            if self.ports is not None:  # its UDP relay ports end with its last session
                self.ports.node_left(conn.key, reason)
        self.metrics.clients.labels(self.region).set(len(self.clients))
        self.flush_counts()
        now = time.time()
        log.info(
            "relay session close: node %d from %s after %.1f s: %s",
            conn.node_id,
            conn.peer,
            now - conn.opened,
            reason,
        )
        if self.on_session is not None:
            self.on_session(
                SessionRecord(
                    node_id=conn.node_id,
                    key=conn.key,
                    region=self.region,
                    transport=conn.transport_name,
                    opened=conn.opened,
                    duration=round(now - conn.opened, 3),
                    rx_bytes=conn.rx_bytes,
                    tx_bytes=conn.tx_bytes,
                    drops=conn.drops,
                    reason=reason[: relayfeed.MAX_TEXT],
                )
            )

    def revoke_node(self, node_id: int, reason: str, keep_key: bytes | None = None) -> int:
        """Disconnect every session of `node_id` at once (node removed or expired; with `keep_key`, its
        sessions under any other WireGuard key: the key was rotated); returns how many."""
        victims = [c for c in self.clients.values() if c.node_id == node_id and c.key != keep_key]
        for c in victims:
            c.close(reason, tell=True)
        return len(victims)

    def tick(self) -> None:
        """Periodic: close sessions whose ticket expired without renewal, flush counters, keepalives."""
        now = self.clock()
        for c in [c for c in self.clients.values() if now >= c.not_after]:
            c.close("relay ticket expired", tell=True)
        born_before = time.time() - HELLO_TIMEOUT
        for c in [c for c in self.conns if c.key is None and c.opened < born_before]:
            c.close("no CLIENT_HELLO in time", tell=True)
        self._expire_held()
        self.flush_counts()
        if self.ports is not None:
            self.ports.tick()

    def close_all(self, reason: str) -> None:
        for c in list(self.conns):
            c.close(reason, tell=True)
        if self.ports is not None:
            self.ports.close(reason)
