"""Per-peer local UDP proxy: a 127.0.0.1 socket that is the peer's WireGuard endpoint while relayed.

WireGuard sends the peer's datagrams to this socket; we wrap each in SEND_PACKET(peer key). What the relay
delivers as RECV_PACKET(src = peer key) we send from this socket to WireGuard's listen port, so WireGuard
sees the peer at this address. Works with both backends (wireguard-go and the kernel listen on all
addresses). Socket buffers are sized deliberately (the default ~208 KiB overflows under bulk traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Collection
from typing import cast

log = logging.getLogger("meshd.relay")

SOCK_BUF = 4 << 20  #: UDP buffers (the local leg; the TCP relay leg uses meshd.proto.relay.SOCK_BUF)
SO_SNDBUFFORCE = 32  #: Linux socket(7)
SO_RCVBUFFORCE = 33
LOOPBACK = "127.0.0.1"


class PeerProxy(asyncio.DatagramProtocol):
    def __init__(self, peer_key: bytes, wg_port: int, forward: Callable[[bytes, bytes], None]) -> None:
        self.peer_key = peer_key
        self.wg_addr = (LOOPBACK, wg_port)
        self.forward = forward  #: (dst key, packet) -> the relay
        self.transport: asyncio.DatagramTransport | None = None
        self.sent = 0  #: datagrams from WireGuard forwarded to the relay
        self.delivered = 0  #: datagrams from the relay handed to WireGuard
        self.refused = 0  #: datagrams from anyone but WireGuard
        self.bound: tuple[str, int] = (LOOPBACK, 0)
        self.task: asyncio.Task[None] | None = None
        self.sock: socket.socket | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        if self.closed:
            self.transport.close()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[1] != self.wg_addr[1] or addr[0] != LOOPBACK:
            self.refused += 1
            return
        self.sent += 1
        self.forward(self.peer_key, data)

    def deliver(self, packet: bytes | memoryview) -> None:
        self.delivered += 1
        if self.transport is not None:
            self.transport.sendto(packet, self.wg_addr)
        elif self.sock is not None:  # bound a moment ago, not attached to the loop yet
            with contextlib.suppress(OSError):
                self.sock.sendto(packet, self.wg_addr)

    @property
    def address(self) -> tuple[str, int]:
        return self.bound

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        elif self.task is not None:
            self.task.add_done_callback(lambda _: self.transport.close() if self.transport else None)


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
    """Bind a proxy socket now (synchronously: the endpoint must exist the moment a peer appears)."""
    sock = udp_socket(LOOPBACK, 0)
    proto = PeerProxy(peer_key, wg_port, forward)
    proto.bound = (LOOPBACK, int(sock.getsockname()[1]))
    proto.sock = sock
    # the endpoint exists from here on (datagrams wait in the socket buffer until the loop reads them)
    proto.task = asyncio.get_running_loop().create_task(_attach(sock, proto))
    return proto


async def _attach(sock: socket.socket, proto: PeerProxy) -> None:
    try:
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: proto, sock=sock)
    except OSError as exc:  # the peer's relayed packets go nowhere until the proxy is opened again
        log.warning("relay proxy on %s:%d failed: %s", *proto.bound, exc)
        sock.close()


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
