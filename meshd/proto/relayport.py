"""UDP relay ports (issue 14), sans-IO: the wire formats and both sides' state machines.

A relayed pair (A, B) gets one UDP port on the relay for each side. A's WireGuard endpoint for B is
``relay:port_A``: the relay forwards what arrives at ``port_A`` from A's bound address out of ``port_B``
to B's bound address, and the reverse. No meshd and no TCP on the data path.

How a port is had (over the node's authenticated relay session, :mod:`meshd.proto.relay` frames)::

    A -> relay  PORT_REQUEST  peer WireGuard key (32)
    B -> relay  PORT_REQUEST  peer WireGuard key (32)         (both must ask: see below)
    relay -> A  PORT_GRANT    peer key (32) + port (2) + secret (16) + idle timeout s (2)
    relay -> B  PORT_GRANT    ...its own port and secret
    A, B -> relay:port        BIND datagrams from the WireGuard port (the raw socket), every few seconds
    relay -> A  PORT_STATE    peer key (32) + flags (1): bit 0 "your side is bound", bit 1 "peer's is"

An allocation is made only when both sides asked for each other: a node asks only for peers in its
signed network map, and the coordinator puts a peer in a map only when the policy lets the two talk,
so a mutual request is the policy's consent, checked by a relay that knows no policy (standalone
regions). The embedded relay checks the policy itself as well (``may_talk``).

A BIND datagram proves the sender holds the side's secret and shows the relay the exact address (NAT
mapping) WireGuard's packets will come from, since it leaves from WireGuard's own port::

    +------------+--------+---------+-------------+-----------------------------+
    | magic 4    | kind 1 | port 2  | counter 8   | HMAC-SHA256(secret, ...)[:16] |
    +------------+--------+---------+-------------+-----------------------------+

``magic`` starts with 0xFF: WireGuard messages start with their type (1 to 4) and three zero bytes
(:func:`is_wireguard`), so the two never collide on the shared port. ``counter`` must grow: a captured
bind replayed from another address is refused. Each grant carries a fresh secret (and resets the
counter), so a bind from an earlier grant is worthless too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntFlag

from meshd.proto.endpoint import Endpoint

KEY_LEN = 32
SECRET_LEN = 16
MAC_LEN = 16
MAGIC = b"\xffMRP"
KIND_BIND = 1
_BIND = struct.Struct("!4sBHQ")
BIND_LEN = _BIND.size + MAC_LEN  #: 31 bytes
_GRANT = struct.Struct("!H16sH")
GRANT_LEN = KEY_LEN + _GRANT.size  #: 52 bytes
STATE_LEN = KEY_LEN + 1

#: The relay ends an allocation nobody used (no bind, no packet) for this long
IDLE_TIMEOUT = 60.0
#: Allocations a node may hold at once (it asks for one per relayed peer), and in all
PER_NODE = 64
TOTAL = 4096
#: Requests waiting for the peer's matching request: per node and how long
PENDING_PER_NODE = 256
PENDING_SECONDS = 30.0
#: The client: binds while not bound (fast, so the upgrade takes a round trip), then refreshes
BIND_RETRY = 0.25
BIND_REFRESH = 2.0
#: The client asks again for a grant this often while it has none (the peer may ask later)
REQUEST_RETRY = 5.0


class RelayPortError(ValueError):
    """A malformed relay-port message; the text says what was wrong."""


class PortFlags(IntFlag):
    NONE = 0
    SELF_BOUND = 1
    PEER_BOUND = 2
    READY = 3
    CLOSED = 4  #: the allocation ended (idle, the peer left): ask again later


def is_wireguard(data: bytes) -> bool:
    """A WireGuard message: type 1-4 (handshake initiation, response, cookie, data) then three zeros."""
    return len(data) >= 4 and 1 <= data[0] <= 4 and data[1:4] == b"\x00\x00\x00"


def looks_like_bind(data: bytes) -> bool:
    return len(data) == BIND_LEN and data[:4] == MAGIC


@dataclass(frozen=True, slots=True)
class Bind:
    """A bind datagram: ``port`` is the relay port it was sent to (covered by the MAC)."""

    port: int
    counter: int
    mac: bytes = field(repr=False)


def _mac(secret: bytes, head: bytes) -> bytes:
    return hmac.new(secret, head, hashlib.sha256).digest()[:MAC_LEN]


def encode_bind(secret: bytes, port: int, counter: int) -> bytes:
    if len(secret) != SECRET_LEN or not 0 < port <= 0xFFFF or not 0 <= counter < 1 << 64:
        raise RelayPortError("bind: 16-byte secret, port 1-65535, counter below 2^64")
    head = _BIND.pack(MAGIC, KIND_BIND, port, counter)
    return head + _mac(secret, head)


def decode_bind(data: bytes) -> Bind:
    if len(data) != BIND_LEN:
        raise RelayPortError(f"bind datagram of {len(data)} bytes, not {BIND_LEN}")
    magic, kind, port, counter = _BIND.unpack_from(data)
    if magic != MAGIC:
        raise RelayPortError("bind datagram: bad magic")
    if kind != KIND_BIND:
        raise RelayPortError(f"bind datagram: unknown kind {kind}")
    if port == 0:
        raise RelayPortError("bind datagram: port 0")
    return Bind(port, counter, data[_BIND.size :])


def bind_valid(secret: bytes, data: bytes, bind: Bind) -> bool:
    """The MAC of a decoded bind (``data`` its bytes) is by ``secret``."""
    return hmac.compare_digest(_mac(secret, data[: _BIND.size]), bind.mac)


# -- frame payloads (carried in meshd.proto.relay PORT_* frames) -------------------------------------------
@dataclass(frozen=True, slots=True)
class Grant:
    """PORT_GRANT: the relay port for our side of the pair with ``peer``, its secret and idle timeout."""

    peer: bytes
    port: int
    secret: bytes = field(repr=False)
    idle: int


def encode_request(peer: bytes) -> bytes:
    if len(peer) != KEY_LEN:
        raise RelayPortError(f"peer key has {len(peer)} bytes, not {KEY_LEN}")
    return peer


def decode_request(payload: bytes) -> bytes:
    if len(payload) != KEY_LEN:
        raise RelayPortError(f"PORT_REQUEST of {len(payload)} bytes, not {KEY_LEN}")
    return payload


def encode_grant(g: Grant) -> bytes:
    if len(g.peer) != KEY_LEN or len(g.secret) != SECRET_LEN or not 0 < g.port <= 0xFFFF:
        raise RelayPortError("grant: 32-byte key, 16-byte secret, port 1-65535")
    if not 0 < g.idle <= 0xFFFF:
        raise RelayPortError("grant: idle timeout 1-65535 s")
    return g.peer + _GRANT.pack(g.port, g.secret, g.idle)


def decode_grant(payload: bytes) -> Grant:
    if len(payload) != GRANT_LEN:
        raise RelayPortError(f"PORT_GRANT of {len(payload)} bytes, not {GRANT_LEN}")
    port, secret, idle = _GRANT.unpack_from(payload, KEY_LEN)
    if port == 0 or idle == 0:
        raise RelayPortError("PORT_GRANT: port and idle timeout must not be 0")
    return Grant(payload[:KEY_LEN], port, secret, idle)


def encode_state(peer: bytes, flags: PortFlags) -> bytes:
    if len(peer) != KEY_LEN:
        raise RelayPortError(f"peer key has {len(peer)} bytes, not {KEY_LEN}")
    return peer + bytes([int(flags) & 7])


def decode_state(payload: bytes) -> tuple[bytes, PortFlags]:
    if len(payload) != STATE_LEN:
        raise RelayPortError(f"PORT_STATE of {len(payload)} bytes, not {STATE_LEN}")
    if payload[KEY_LEN] not in (0, 1, 2, 3, 4):
        raise RelayPortError(f"PORT_STATE: unknown flags {payload[KEY_LEN]:#x}")
    return payload[:KEY_LEN], PortFlags(payload[KEY_LEN])


# -- the relay's side ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class Side:
    """One side of an allocation: the node, its port and secret, the address its binds proved."""

    key: bytes
    node_id: int
    port: int
    secret: bytes = field(repr=False)
    counter: int = 0  #: the last accepted bind's counter
    addr: Endpoint | None = None  #: the bound address: packets from anywhere else are dropped
    packets: int = 0  #: packets received at this port from ``addr`` and forwarded
    bytes: int = 0
    #: the other side (set right after both are made)
    other: Side = field(init=False, repr=False)


@dataclass(eq=False)
class Allocation:
    a: Side
    b: Side
    created: float
    active: float  #: last bind or packet seen (packets are sampled at ``expire``)
    seen: int = 0  #: packets + binds at the last expire (activity is a change)
    binds: int = 0
    rebinds: int = 0  #: binds that moved a side to a new address (NAT rebinding)

    def sides(self) -> tuple[Side, Side]:
        return self.a, self.b


@dataclass(frozen=True, slots=True)
class SendGrant:
    """Send PORT_GRANT to the session of ``to`` (a WireGuard key)."""

    to: bytes
    grant: Grant


@dataclass(frozen=True, slots=True)
class SendState:
    """Send PORT_STATE(peer, flags) to the session of ``to``."""

    to: bytes
    peer: bytes
    flags: PortFlags
    node: int = field(default=0, compare=False)  #: node id of ``to`` (a peer relay signals it)


@dataclass(frozen=True, slots=True)
class Opened:
    """An allocation was made: the shell opens its two ports (``Failed`` back if it cannot)."""

    alloc: Allocation


@dataclass(frozen=True, slots=True)
class Bound:
    """A side (re)bound to a new address: a kernel fast path must follow it."""

    alloc: Allocation


@dataclass(frozen=True, slots=True)
class Ended:
    """An allocation ended (idle, a node left, revoked): close its ports; ``reason`` for the audit."""

    alloc: Allocation
    reason: str


PortEvent = SendGrant | SendState | Opened | Bound | Ended


@dataclass(frozen=True, slots=True)
class Assigned:
    """One side of a pair a coordinator assigned to a peer relay: its node, port and secret."""

    key: bytes
    node_id: int
    port: int
    secret: bytes = field(repr=False)


class Refused(Exception):
    """A PORT_REQUEST that cannot be served (caps, no free port, policy); the text says why."""


class Allocations:
    """The relay's allocations of one region (no sockets, no clock: ``now`` comes in).

    ``free_port`` picks a free port from the range (the shell knows what it can bind); ``may_talk``
    (node id, node id) is the embedded relay's policy check. Outputs come from :meth:`events`.
    """

    def __init__(
        self,
        ports: range,
        *,
        per_node: int = PER_NODE,
        total: int = TOTAL,
        idle: float = IDLE_TIMEOUT,
        may_talk: Callable[[int, int], bool] = lambda a, b: True,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if len(ports) < 2:
            raise ValueError("a UDP relay port range needs at least two ports")
        self.ports = ports
        self.per_node = per_node
        self.total = total
        self.idle = idle
        self.may_talk = may_talk
        self.random = random
        self.by_port: dict[int, Side] = {}
        self.by_pair: dict[frozenset[bytes], Allocation] = {}
        self.per_key: dict[bytes, int] = {}
        #: (asker key, peer key) -> (asker node id, when asked)
        self.pending: dict[tuple[bytes, bytes], tuple[int, float]] = {}
        self._events: list[PortEvent] = []
        self._next = ports.start
        self.refused = 0
        self.bad_binds = 0

    # -- inputs ---------------------------------------------------------------------------------------
    def request(self, key: bytes, node_id: int, peer: bytes, now: float) -> None:
        """``key`` (node ``node_id``, authenticated by its session) asks for a port to ``peer``.

        Raises :class:`Refused` when the request cannot be served."""
        if peer == key:
            raise Refused("a port pair needs two different nodes")
        pair = frozenset((key, peer))
        alloc = self.by_pair.get(pair)
        if alloc is not None:  # asked again (a reconnect, a restart): a fresh secret for this side
            side = alloc.a if alloc.a.key == key else alloc.b
            if side.node_id != node_id:
                raise Refused("the allocation belongs to another node")
            side.secret = self.random(SECRET_LEN)
            side.counter = 0
            self._events.append(SendGrant(key, Grant(peer, side.port, side.secret, int(self.idle))))
            self._events.append(SendState(key, peer, self._flags(side), node_id))
            return
        back = self.pending.pop((peer, key), None)
        if back is None or now - back[1] > PENDING_SECONDS:
            mine = sum(1 for k in self.pending if k[0] == key)
            if mine >= PENDING_PER_NODE and (key, peer) not in self.pending:
                raise Refused(f"more than {PENDING_PER_NODE} port requests waiting for their peers")
            self.pending[(key, peer)] = (node_id, now)
            return
        peer_node = back[0]
        if not self.may_talk(node_id, peer_node):
            self.refused += 1
            raise Refused("the policy does not let these nodes talk")
        for k in (key, peer):
            if self.per_key.get(k, 0) >= self.per_node:
                self.refused += 1
                raise Refused(f"a node may hold {self.per_node} relay port pairs")
        if len(self.by_pair) >= self.total or len(self.by_port) + 2 > len(self.ports):
            self.refused += 1
            raise Refused("the relay has no free UDP ports")
        pa, pb = self._free_ports()
        a = Side(key, node_id, pa, self.random(SECRET_LEN))
        b = Side(peer, peer_node, pb, self.random(SECRET_LEN))
        a.other, b.other = b, a
        alloc = Allocation(a, b, now, now)
        self.by_pair[pair] = alloc
        self.by_port[pa] = a
        self.by_port[pb] = b
        for k in (key, peer):
            self.per_key[k] = self.per_key.get(k, 0) + 1
        self._events.append(Opened(alloc))
        for s in (a, b):
            self._events.append(SendGrant(s.key, Grant(s.other.key, s.port, s.secret, int(self.idle))))

    def assign(self, a: Assigned, b: Assigned, now: float) -> None:
        """A peer relay (issue 14): the coordinator chose the pair's ports and secrets and sent them to
        both nodes; no request and no grant here. The same assignment again changes nothing (bind
        counters stay); a different one for the pair, or one on a port another pair holds, replaces it.
        Raises :class:`Refused` for ports outside the range or past the caps."""
        if a.key == b.key or a.port == b.port:
            raise Refused("a port pair needs two different nodes and ports")
        for s in (a, b):
            if s.port not in self.ports or len(s.secret) != SECRET_LEN:
                raise Refused(f"port {s.port} is not in the relay's range")
        pair = frozenset((a.key, b.key))
        old = self.by_pair.get(pair)
        if old is not None:
            mine = {(s.key, s.node_id, s.port, s.secret) for s in old.sides()}
            if mine == {(s.key, s.node_id, s.port, s.secret) for s in (a, b)}:
                return
            self._end(old, "reassigned")
        for s in (a, b):
            held = self.by_port.get(s.port)
            if held is not None:
                self._end(self.by_pair[frozenset((held.key, held.other.key))], "port reassigned")
        for k in (a.key, b.key):
            if self.per_key.get(k, 0) >= self.per_node:
                self.refused += 1
                raise Refused(f"a node may hold {self.per_node} relay port pairs")
        if len(self.by_pair) >= self.total:
            self.refused += 1
            raise Refused("the relay holds its most port pairs")
        sa = Side(a.key, a.node_id, a.port, a.secret)
        sb = Side(b.key, b.node_id, b.port, b.secret)
        sa.other, sb.other = sb, sa
        alloc = Allocation(sa, sb, now, now)
        self.by_pair[pair] = alloc
        self.by_port[a.port], self.by_port[b.port] = sa, sb
        for k in (a.key, b.key):
            self.per_key[k] = self.per_key.get(k, 0) + 1
        self._events.append(Opened(alloc))

    def unassign(self, key_a: bytes, key_b: bytes, reason: str) -> None:
        """The coordinator withdrew the pair's peer relay."""
        alloc = self.by_pair.get(frozenset((key_a, key_b)))
        if alloc is not None:
            self._end(alloc, reason)

    def failed(self, alloc: Allocation, reason: str) -> None:
        """The shell could not open the ports of ``alloc``: it ends (the nodes stay on the TCP relay)."""
        self._end(alloc, reason)

    def bind(self, port: int, src: Endpoint, data: bytes, now: float) -> bool:
        """A datagram that looks like a bind arrived at ``port`` from ``src``: True if it was accepted."""
        side = self.by_port.get(port)
        try:
            b = decode_bind(data)
        except RelayPortError:
            self.bad_binds += 1
            return False
        if (
            side is None
            or b.port != port
            or not bind_valid(side.secret, data, b)
            or b.counter <= side.counter
        ):
            self.bad_binds += 1
            return False
        side.counter = b.counter
        alloc = self.by_pair[frozenset((side.key, side.other.key))]
        alloc.active = now
        alloc.binds += 1
        if side.addr != src:
            first = side.addr is None
            side.addr = src
            if not first:
                alloc.rebinds += 1
            self._events.append(Bound(alloc))
            if first:
                for s in alloc.sides():
                    self._events.append(SendState(s.key, s.other.key, self._flags(s), s.node_id))
        return True

    def node_left(self, key: bytes, reason: str) -> None:
        """``key`` has no session here any more (closed, revoked, key rotated): its allocations end."""
        for k in [k for k in self.pending if key in k]:
            del self.pending[k]
        for alloc in [a for p, a in self.by_pair.items() if key in p]:
            self._end(alloc, reason)

    def expire(self, now: float) -> None:
        """Periodic: end allocations idle for ``idle`` seconds; forget stale pending requests."""
        for alloc in list(self.by_pair.values()):
            seen = alloc.a.packets + alloc.b.packets + alloc.binds
            if seen != alloc.seen:
                alloc.seen = seen
                alloc.active = now
            elif now - alloc.active >= self.idle:
                self._end(alloc, "idle")
        for k in [k for k, (_, t) in self.pending.items() if now - t > PENDING_SECONDS]:
            del self.pending[k]

    def close_all(self, reason: str) -> None:
        for alloc in list(self.by_pair.values()):
            self._end(alloc, reason)

    # -- outputs --------------------------------------------------------------------------------------
    def events(self) -> list[PortEvent]:
        out, self._events = self._events, []
        return out

    # -- internals ------------------------------------------------------------------------------------
    @staticmethod
    def _flags(side: Side) -> PortFlags:
        flags = PortFlags.NONE
        if side.addr is not None:
            flags |= PortFlags.SELF_BOUND
        if side.other.addr is not None:
            flags |= PortFlags.PEER_BOUND
        return flags

    def _free_ports(self) -> tuple[int, int]:
        """The next two free ports after the last one handed out (round robin: a just-freed port is not
        handed to the next pair at once, so late packets of the old pair do not reach the new one)."""
        got: list[int] = []
        for _ in range(len(self.ports)):
            p = self._next
            self._next = p + 1 if p + 1 < self.ports.stop else self.ports.start
            if p not in self.by_port:
                got.append(p)
                if len(got) == 2:
                    return got[0], got[1]
        raise Refused("the relay has no free UDP ports")  # checked before; kept for safety

    def _end(self, alloc: Allocation, reason: str) -> None:
        pair = frozenset((alloc.a.key, alloc.b.key))
        if self.by_pair.get(pair) is not alloc:
            return
        del self.by_pair[pair]
        for s in alloc.sides():
            self.by_port.pop(s.port, None)
            left = self.per_key.get(s.key, 1) - 1
            if left:
                self.per_key[s.key] = left
            else:
                self.per_key.pop(s.key, None)
            self._events.append(SendState(s.key, s.other.key, PortFlags.CLOSED, s.node_id))
        self._events.append(Ended(alloc, reason))


# -- the node's side ----------------------------------------------------------------------------------------
@dataclass
class _Want:
    grant: Grant | None = None
    flags: PortFlags = PortFlags.NONE
    counter: int = 0
    next_bind: float = 0.0
    asked: float | None = None  #: when PORT_REQUEST was last sent


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Send PORT_REQUEST(peer) over the relay session."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class SendBind:
    """Send ``data`` from the WireGuard port to the relay's ``port``."""

    data: bytes
    port: int


@dataclass(frozen=True, slots=True)
class Moved:
    """The peer's relay endpoint changed: ``port`` (both sides bound: use relay:port) or None (TCP)."""

    peer: bytes
    port: int | None


ClientEvent = SendRequest | SendBind | Moved


class PortClient:
    """The relay ports of one node on one relay session (no sockets, no clock).

    :meth:`want` says which peers are relayed now; the client asks for their ports, binds them and
    reports :class:`Moved` when a peer's port is usable (both sides bound) and when it stops being so.
    """

    def __init__(self, counter_base: Callable[[], int] = lambda: 0) -> None:
        self._want: dict[bytes, _Want] = {}
        self._events: list[ClientEvent] = []
        #: a grant's first bind counter - 1. A region relay resets the counter with each grant; a peer
        #: relay keeps it for an assignment the coordinator re-sends, so a restarted meshd starts from
        #: the clock (milliseconds) to stay above what it sent before
        self.counter_base = counter_base

    def want(self, peer: bytes, on: bool, now: float) -> None:
        w = self._want.get(peer)
        if on and w is None:
            self._want[peer] = _Want(asked=now)
            self._events.append(SendRequest(peer))
        elif not on and w is not None:
            del self._want[peer]
            if w.flags == PortFlags.READY:
                self._events.append(Moved(peer, None))

    def wanted(self, peer: bytes) -> bool:
        return peer in self._want

    def granted(self, g: Grant, now: float) -> None:
        w = self._want.get(g.peer)
        if w is None:
            return  # we no longer want it: the relay ends it when idle
        if w.grant == g:
            return  # the same grant again (a peer relay's re-sent assignment): keep binding as before
        was_ready = w.flags == PortFlags.READY
        w.grant, w.counter, w.flags = g, self.counter_base(), PortFlags.NONE
        if was_ready:
            self._events.append(Moved(g.peer, None))
        self._bind(w, now)

    def state(self, peer: bytes, flags: PortFlags, now: float) -> None:
        w = self._want.get(peer)
        if w is None or w.grant is None:
            return
        before = w.flags
        if flags & PortFlags.CLOSED:  # the relay ended it: ask again after REQUEST_RETRY
            w.grant, w.flags, w.asked = None, PortFlags.NONE, now
            if before == PortFlags.READY:
                self._events.append(Moved(peer, None))
            return
        w.flags = flags
        if flags == PortFlags.READY and before != PortFlags.READY:
            self._events.append(Moved(peer, w.grant.port))
        elif flags != PortFlags.READY and before == PortFlags.READY:
            self._events.append(Moved(peer, None))

    def session_lost(self, now: float) -> None:
        """The relay session closed: every port is gone with it (a restarted relay knows none)."""
        for peer, w in self._want.items():
            if w.flags == PortFlags.READY:
                self._events.append(Moved(peer, None))
            w.grant, w.flags, w.asked = None, PortFlags.NONE, None

    def session_up(self, now: float) -> None:
        """A (new) relay session: ask for every wanted peer's port again."""
        for peer, w in self._want.items():
            if w.grant is None:
                w.asked = now
                self._events.append(SendRequest(peer))

    def port(self, peer: bytes) -> int | None:
        w = self._want.get(peer)
        return w.grant.port if w is not None and w.grant is not None and w.flags == PortFlags.READY else None

    def next_timer(self) -> float | None:
        times = [w.next_bind for w in self._want.values() if w.grant is not None]
        times += [
            w.asked + REQUEST_RETRY for w in self._want.values() if w.grant is None and w.asked is not None
        ]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for peer, w in self._want.items():
            if w.grant is not None and now >= w.next_bind:
                self._bind(w, now)
            elif w.grant is None and w.asked is not None and now >= w.asked + REQUEST_RETRY:
                w.asked = now
                self._events.append(SendRequest(peer))

    def events(self) -> list[ClientEvent]:
        out, self._events = self._events, []
        return out

    def _bind(self, w: _Want, now: float) -> None:
        assert w.grant is not None
        w.counter += 1
        self._events.append(SendBind(encode_bind(w.grant.secret, w.grant.port, w.counter), w.grant.port))
        w.next_bind = now + (BIND_REFRESH if w.flags & PortFlags.SELF_BOUND else BIND_RETRY)
