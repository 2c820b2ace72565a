"""UDP relay ports, the serving side's asyncio shell around :class:`meshd.proto.relayport.Allocations`,
shared by the region relays (coordinator/relay/udp.py) and peer relays (meshd/relay/peerrelay.py).

Each allocation owns two UDP sockets (one port per side) bound on the relay's address. Userspace
forwarding is one hop: a WireGuard message arriving at side A's port from A's bound address is sent
out of B's port to B's bound address, and nothing else is forwarded (binds go to the core; anything
else is dropped and counted). The hot path is a tuple comparison, a 4-byte check and one ``sendto``.

With a kernel forwarder (:mod:`meshd.relay.udpkernel`, when the process has CAP_NET_ADMIN) the
bound pair is also installed as nftables DNAT/SNAT rules, so WireGuard packets stop reaching Python;
binds still do (they come from the node's WireGuard port, so they match the rule; see udpkernel).
The install runs on the forwarder's own thread (meshd.relay.forwarderthread: it takes tens of ms of
processes); until it is done the pair's ports forward nothing in userspace (a packet sent from a port
then would leave a conntrack entry that moves the kernel's masquerade to another port) and the "bound"
state the nodes wait for is held back, so they stay on the TCP relay until the kernel path is ready.

What the core asks to tell a node (grants, states) and what an ended allocation leaves (audit records)
differ between the two programs: subclasses implement :meth:`PortServer._send_grant`,
:meth:`PortServer._send_state` and :meth:`PortServer._on_ended`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from meshd.proto import relayport
from meshd.proto.endpoint import Endpoint
from meshd.proto.relayport import Allocation, Allocations, Grant, PortFlags, Side
from meshd.relay.proxy import udp_socket  # 4 MiB buffers: bulk WireGuard overflows the default

log = logging.getLogger("meshd.relay.ports")

_WG_TYPES = frozenset((1, 2, 3, 4))


def parse_range(text: str) -> range | None:
    """``LOW-HIGH`` (inclusive) as a range, ``0``/``off``/empty as None; ValueError says what is wrong."""
    text = text.strip().lower()
    if text in ("", "0", "off", "none"):
        return None
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise ValueError(f"UDP relay ports must be LOW-HIGH, not {text!r}") from None
    if not 1 <= lo < hi <= 65535:
        raise ValueError(f"UDP relay ports {text!r}: need 1 <= LOW < HIGH <= 65535 (at least two ports)")
    return range(lo, hi + 1)


class KernelForwarder(Protocol):
    """The fast path: install/remove the forwarding of one bound allocation (udpkernel.NftForwarder)."""

    def install(self, alloc: Allocation, done: Callable[[], None]) -> None:
        """Start installing; ``done()`` follows from any thread, whether it worked or not."""
        ...

    def remove(self, alloc: Allocation) -> None: ...
    def counters(self, alloc: Allocation) -> tuple[int, int, int, int] | None: ...
    def close(self) -> None: ...


#: datagrams read per readiness event: a busy port costs one event-loop wake-up per batch, not per
#: packet (libuv reads up to 32 the same way); other ports and the loop's own work wait at most this long
READ_BATCH = 64
#: the largest datagram read: WireGuard's largest message on a 1500-byte link plus slack; a longer one
#: arrives truncated and is dropped (it cannot be WireGuard's)
READ_MAX = 2048


class _Port:
    """One side's port: its socket, read straight from the event loop's readiness callback.

    ``side`` is the core's record; ``out`` the other side's port (it sends). No asyncio transport sits
    in between: each datagram is read into one reused buffer with ``recvfrom_into`` and a WireGuard
    message is sent on with the other port's ``sendto`` of a view of that buffer, so the hot path
    allocates only what the read itself returns (the source address) and the view, and costs the same
    on asyncio's loop (meshd: peer relays) as on uvloop (the coordinator). Measured with
    ``benchmarks/udp_forward_cpu.py`` (20,000 packets/s of 1404 bytes): 6-7 us of relay CPU per packet
    on either loop; the asyncio datagram transport this replaced cost 24 us on asyncio's loop and lost
    60 % of the packets (6 us on uvloop).
    """

    __slots__ = ("_buf", "_view", "closed", "dropped", "out", "owner", "paused", "side", "sock")

    def __init__(self, owner: PortServer, side: Side, sock: socket.socket) -> None:
        self.owner = owner
        self.side = side
        self.sock = sock
        self.out: _Port | None = None
        self.dropped = 0  #: datagrams neither forwarded nor a bind (spoofed, unbound, not WireGuard)
        self.closed = False
        self.paused = False  #: the kernel forwarding of our pair is being installed: forward nothing
        self._buf = bytearray(READ_MAX)
        self._view = memoryview(self._buf)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.sock.fileno(), self._readable)

    def close(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if self.closed:
            return
        self.closed = True
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):  # never started, or the loop is going away
                loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _readable(self) -> None:
        sock, side, buf, view = self.sock, self.side, self._buf, self._view
        for _ in range(READ_BATCH):
            try:
                n, addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # a queued ICMP error (a node that went away): its next bind or idle decides
                continue
            if (
                addr == side.addr
                and n >= 4
                and buf[0] in _WG_TYPES
                and buf[1] == 0
                and buf[2] == 0
                and buf[3] == 0
            ):
                other, out = side.other, self.out
                if other.addr is not None and out is not None and not out.closed and not self.paused:
                    try:
                        out.sock.sendto(view[:n], other.addr)
                    except OSError:  # the send buffer is full (UDP may drop) or the route went away
                        out.dropped += 1
                        continue
                    side.packets += 1
                    side.bytes += n
                    continue
            data = bytes(view[:n])
            if relayport.looks_like_bind(data):
                self.owner.bind(side.port, addr, data)
                if self.closed:  # the bind ended this allocation: its socket is closed
                    return
                continue
            self.dropped += 1


@dataclass
class _Installing:
    count: int = 0  #: kernel installs of the pair under way (a rebind may start one more)
    held: list[relayport.SendState] = field(default_factory=list)  #: states told when the last is done


class PortServer:
    """The UDP relay ports of one relay (see the module docstring)."""

    def __init__(
        self,
        host: str,
        core: Allocations,
        *,
        kernel: KernelForwarder | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = "0.0.0.0" if host in ("", "::", "0.0.0.0") else host
        self.core = core
        self.kernel = kernel
        self.clock = clock
        self.protos: dict[int, _Port] = {}
        self._opened_wall: dict[int, float] = {}  #: allocation id -> wall clock at creation (audit)
        self._installing: dict[int, _Installing] = {}  #: id(alloc) -> its kernel installs under way
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    @property
    def allocations(self) -> int:
        return len(self.core.by_pair)

    # -- hooks ----------------------------------------------------------------------------------------
    def _send_grant(self, to: bytes, grant: Grant) -> None:
        """Tell node ``to`` (WireGuard key) its port and secret (region relays; peer relays never)."""

    def _send_state(self, to: bytes, peer: bytes, flags: PortFlags, node: int) -> None:
        """Tell node ``to`` (node id ``node``) whether its pair with ``peer`` is bound."""

    def _on_ended(self, alloc: Allocation, reason: str, opened: float) -> None:
        """An allocation ended and its ports are closed (``opened``: wall clock at creation)."""

    # -- inputs ---------------------------------------------------------------------------------------
    def bind(self, port: int, src: Endpoint, data: bytes) -> None:
        self.core.bind(port, src, data, self.clock())
        self._run()

    def tick(self) -> None:
        """Periodic: sample kernel counters, expire idle allocations."""
        if self.kernel is not None:
            for alloc in self.core.by_pair.values():
                got = self.kernel.counters(alloc)
                if got is not None:  # kernel-forwarded packets count as the sides' traffic
                    pa, ba, pb, bb = got
                    alloc.a.packets, alloc.a.bytes = max(alloc.a.packets, pa), max(alloc.a.bytes, ba)
                    alloc.b.packets, alloc.b.bytes = max(alloc.b.packets, pb), max(alloc.b.bytes, bb)
        self.core.expire(self.clock())
        self._run()

    def close(self, reason: str) -> None:
        self.core.close_all(reason)
        self._run()
        self.closed = True
        if self.kernel is not None:
            self.kernel.close()

    # -- effects ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        for ev in self.core.events():
            if isinstance(ev, relayport.SendGrant):
                self._send_grant(ev.to, ev.grant)
            elif isinstance(ev, relayport.SendState):
                pending = self._installing.get(id(self.core.by_pair.get(frozenset((ev.to, ev.peer)))))
                if pending is not None and ev.flags != PortFlags.CLOSED:
                    pending.held.append(ev)  # told once the kernel forwards the pair
                else:
                    self._send_state(ev.to, ev.peer, ev.flags, ev.node)
            elif isinstance(ev, relayport.Opened):
                self._open(ev.alloc)
            elif isinstance(ev, relayport.Bound):
                if self.kernel is not None and ev.alloc.a.addr and ev.alloc.b.addr:
                    self._install(ev.alloc, self.kernel)
            else:
                self._ended(ev.alloc, ev.reason)

    def _install(self, alloc: Allocation, kernel: KernelForwarder) -> None:
        self._installing.setdefault(id(alloc), _Installing()).count += 1
        self._pause(alloc, True)
        loop = asyncio.get_running_loop()

        def done() -> None:  # on the forwarder's thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: so is the pair
                loop.call_soon_threadsafe(self._installed, alloc)

        kernel.install(alloc, done)

    def _installed(self, alloc: Allocation) -> None:
        """One install of ``alloc`` is done (on the loop): after the last, forward and tell the nodes."""
        pending = self._installing.get(id(alloc))
        if pending is None:
            return  # ended meanwhile (_ended dropped it; the closure keeps alloc, so its id is not reused)
        pending.count -= 1
        if pending.count > 0:
            return
        del self._installing[id(alloc)]
        self._pause(alloc, False)
        for ev in pending.held:
            self._send_state(ev.to, ev.peer, ev.flags, ev.node)

    def _pause(self, alloc: Allocation, paused: bool) -> None:
        for s in alloc.sides():
            port = self.protos.get(s.port)
            if port is not None:
                port.paused = paused

    def _open(self, alloc: Allocation) -> None:
        if self.closed:
            self.core.failed(alloc, "relay shutting down")
            return
        made: list[tuple[int, socket.socket]] = []
        try:
            for s in alloc.sides():
                made.append((s.port, udp_socket(self.host, s.port)))
        except OSError as exc:
            for _, sock in made:
                sock.close()
            log.warning("relay ports %d/%d: %s", alloc.a.port, alloc.b.port, exc)
            self.core.failed(alloc, f"cannot open the ports: {exc}")
            return
        loop = self._loop = asyncio.get_running_loop()
        (_, sock_a), (_, sock_b) = made
        pa, pb = _Port(self, alloc.a, sock_a), _Port(self, alloc.b, sock_b)
        pa.out, pb.out = pb, pa
        for port in (pa, pb):
            self.protos[port.side.port] = port
            port.start(loop)  # datagrams that arrived since the bind wait in the socket buffer
        self._opened_wall[id(alloc)] = time.time()
        log.info(
            "relay ports %d/%d for nodes %d and %d",
            alloc.a.port,
            alloc.b.port,
            alloc.a.node_id,
            alloc.b.node_id,
        )

    def _ended(self, alloc: Allocation, reason: str) -> None:
        self._installing.pop(id(alloc), None)  # its held states go: the nodes are told it closed
        if self.kernel is not None:
            with contextlib.suppress(Exception):  # logged inside; nothing else to do
                self.kernel.remove(alloc)
        for s in alloc.sides():
            port = self.protos.pop(s.port, None)
            if port is not None:
                port.close(self._loop)
        opened = self._opened_wall.pop(id(alloc), time.time())
        log.info(
            "relay ports %d/%d closed (%s): %d/%d bytes forwarded, %d binds, %d rebinds",
            alloc.a.port,
            alloc.b.port,
            reason,
            alloc.a.bytes,
            alloc.b.bytes,
            alloc.binds,
            alloc.rebinds,
        )
        self._on_ended(alloc, reason, opened)
