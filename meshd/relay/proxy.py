"""Per-peer local UDP proxy: a 127.0.0.1 socket that is the peer's WireGuard endpoint while relayed.

WireGuard sends the peer's datagrams to this socket; we wrap each in SEND_PACKET(peer key). What the relay
delivers as RECV_PACKET(src = peer key) we send from this socket to WireGuard's listen port, so WireGuard
sees the peer at this address. Works with both backends (wireguard-go and the kernel listen on all
addresses).

The socket is read directly from the event loop's reader callback, up to :data:`READ_BATCH` datagrams per
wake-up (asyncio's datagram transport reads one per loop iteration), so the packets WireGuard sent in a
burst reach the relay link together and leave in one write (meshd/relay/link.py batches per iteration).
Delivery to WireGuard is one ``sendto`` of the relay's bytes (a view into the read, no copy); a datagram
the socket cannot take right now is dropped and counted, as a full queue on a UDP path would drop it.

Socket buffers: 4 MiB each way, on purpose. The default (~208 KiB, net.core.rmem_default) holds ~150
full-size packets: a burst from the relay (a TCP read of 64-256 KiB is delivered back to back) or a
WireGuard burst while the loop is busy elsewhere overflows it, and every overflow is a loss the inner TCP
flow answers by halving its window. 4 MiB is ~3000 packets: tens of milliseconds at the rates the relay
path carries, and only kernel memory actually queued is used (loopback, per relayed peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Collection

from meshd.proto.endpoint import Endpoint

log = logging.getLogger("meshd.relay")

SOCK_BUF = 4 << 20  #: UDP buffers (the local leg; the TCP relay leg autotunes: meshd.proto.relay.SOCK_BUF)
SO_SNDBUFFORCE = 32  #: Linux socket(7)
SO_RCVBUFFORCE = 33
LOOPBACK = "127.0.0.1"
READ_BATCH = 64  #: datagrams read per wake-up at most (then the loop serves the others)
MAX_DATAGRAM = 65535


class PeerProxy:
    def __init__(self, peer_key: bytes, wg_port: int, forward: Callable[[bytes, bytes], None]) -> None:
        self.peer_key = peer_key
        self.wg_addr = (LOOPBACK, wg_port)
        self.forward = forward  #: (dst key, packet) -> the relay
        self.sent = 0  #: datagrams from WireGuard forwarded to the relay
        self.delivered = 0  #: datagrams from the relay handed to WireGuard
        self.refused = 0  #: datagrams from anyone but WireGuard
        self.dropped = 0  #: datagrams for WireGuard the socket could not take
        self.bound: Endpoint = (LOOPBACK, 0)
        self.sock: socket.socket | None = None
        self.closed = False

    def readable(self) -> None:
        """The loop's reader callback: forward what WireGuard sent, a batch at a time."""
        sock = self.sock
        if sock is None:
            return
        wg_addr, forward, key = self.wg_addr, self.forward, self.peer_key
        for _ in range(READ_BATCH):
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ECONNREFUSED from an ICMP error: nothing to read after all
                log.debug("relay proxy %s:%d: %s", *self.bound, exc)
                return
            if addr != wg_addr:
                self.refused += 1
                continue
            self.sent += 1
            forward(key, data)

    def deliver(self, packet: bytes | memoryview) -> None:
        self.delivered += 1
        if self.sock is None:
            return
        try:
            self.sock.sendto(packet, self.wg_addr)
        except OSError:  # the socket buffer is full (or WireGuard is gone): a lost datagram, counted
            self.dropped += 1

    @property
    def address(self) -> Endpoint:
        return self.bound

    def close(self) -> None:
        self.closed = True
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(RuntimeError, ValueError):  # the loop is closed already
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()


def udp_socket(host: str, port: int) -> socket.socket:
    """A non-blocking IPv4 UDP socket bound to (host, port) with SOCK_BUF buffers (also the relay's UDP
    relay ports, coordinator/relay/udp.py)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for opt, force in ((socket.SO_RCVBUF, SO_RCVBUFFORCE), (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
            with contextlib.suppress(OSError):  # beyond net.core.rmem_max/wmem_max (we run as root)
                sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def open_proxy(peer_key: bytes, wg_port: int, forward: Callable[[bytes, bytes], None]) -> PeerProxy:
    """Bind a proxy socket now (synchronously: the endpoint must exist the moment a peer appears) and
    read it from the running loop."""
    sock = udp_socket(LOOPBACK, 0)
    proto = PeerProxy(peer_key, wg_port, forward)
    proto.bound = (LOOPBACK, int(sock.getsockname()[1]))
    proto.sock = sock
    try:
        asyncio.get_running_loop().add_reader(sock.fileno(), proto.readable)
    except BaseException:
        sock.close()
        raise
    return proto


class ProxyTable:
    """The proxies by peer key: opened on demand, only for peers in the map (:meth:`keep_only` closes
    those of peers that left), so the table is bounded by the map."""

    def __init__(self, wg_port: int, forward: Callable[[bytes, bytes], None]) -> None:
        self.wg_port = wg_port
        self.forward = forward
        self._proxies: dict[bytes, PeerProxy] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._proxies

    def get(self, key: bytes) -> PeerProxy | None:
        """The peer's proxy if it has one (never binds)."""
        return self._proxies.get(key)

    def open(self, key: bytes) -> PeerProxy:
        """The peer's proxy, bound now if it has none (OSError when no socket can be had)."""
        proxy = self._proxies.get(key)
        if proxy is None:
            proxy = self._proxies[key] = open_proxy(key, self.wg_port, self.forward)
        return proxy

    def deliver(self, src: bytes, packet: bytes | memoryview) -> None:
        """A packet from the relay to WireGuard, from the peer's proxy."""
        try:
            proxy = self.open(src)
        except OSError as exc:  # out of sockets: drop this packet, the next one tries again
            log.warning("relay: no local proxy for a peer: %s", exc)
            return
        proxy.deliver(packet)

    def keep_only(self, keys: Collection[bytes]) -> None:
        for key in [k for k in self._proxies if k not in keys]:
            self._proxies.pop(key).close()

    def close(self) -> None:
        for p in self._proxies.values():
            p.close()
        self._proxies.clear()
