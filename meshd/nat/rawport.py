"""Send and receive STUN and probe datagrams on the WireGuard port while WireGuard owns it (IPv4, IPv6).

WireGuard holds the UDP socket bound to its listen port; we cannot bind it again. A raw
``IPPROTO_UDP`` socket can still *send* datagrams whose UDP source port is the WireGuard port (we write
the UDP header ourselves) and *receive* a copy of every UDP datagram the host gets. Because the packets
really leave from the WireGuard port, the NAT mapping STUN learns and the holes probes punch are the ones
WireGuard's own traffic uses.

A classic BPF filter attached to the socket keeps WireGuard's data packets in the kernel: only datagrams
to our port whose payload starts with the probe magic, or carries the STUN magic cookie at offset 4
(RFC 8489 §6), are copied to us. WireGuard also receives those datagrams and drops them as invalid.

IPv6 (issue 15) needs a socket of its own, and it differs in two ways: a raw IPv6 socket carries no IP
header in either direction (RFC 3542 §3: the datagram starts at the UDP header, the source address comes
from ``recvfrom``), so its filter reads the UDP header at offset 0; and UDP over IPv6 must carry a
checksum (RFC 8200 §8.1), which the kernel fills in when told its offset (``IPV6_CHECKSUM``). A host
without IPv6 (or with it disabled) simply has no IPv6 socket: IPv4 works as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import socket
import struct

from meshd.proto import disco, stun
from meshd.proto.endpoint import Endpoint, format_endpoint

log = logging.getLogger("meshd.nat")

SO_ATTACH_FILTER = 26
SO_MARK = 36
UDP_CHECKSUM_OFFSET = 6  #: where the kernel writes the checksum of a raw IPv6 UDP datagram


def mark_underlay(sock: socket.socket) -> None:
    """Give ``sock``'s packets WireGuard's fwmark: like WireGuard's own packets they are underlay, so an
    exit node's policy routing (meshd/exitnode.py: ``not fwmark TABLE lookup TABLE``) never sends a probe,
    a STUN query or a relay bind into the tunnel. Without an exit node no rule looks at the mark."""
    from meshd.exitnode import TABLE  # the mark is the exit table's number, as in wg-quick

    # needs CAP_NET_ADMIN: without it, probes simply follow the routing table
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, TABLE)


_UDP_HEADER = struct.Struct("!HHHH")


class RawPortError(OSError):
    """The raw socket could not be opened (needs CAP_NET_RAW) or a datagram could not be sent."""


def _bpf_program(port: int, *, ipv6: bool = False) -> list[tuple[int, int, int, int]]:
    """cBPF (code, jt, jf, k): accept UDP datagrams to ``port`` carrying probe magic or the STUN cookie.

    A raw IPv4 socket delivers the IPv4 header, so the UDP header sits at 4*IHL (``ldx msh``, then
    indexed loads); a raw IPv6 socket delivers none, so it sits at 0 (absolute loads). Jump offsets count
    from the next instruction.
    """
    magic = struct.unpack("!I", disco.MAGIC)[0]
    ldh, ld = (0x28, 0x20) if ipv6 else (0x48, 0x40)  # absolute or indexed (X +) loads
    jeq, ret = 0x15, 0x06
    head = [] if ipv6 else [(0xB1, 0, 0, 0)]  # ldx msh: X = 4 * (IP[0] & 0xf)
    return [
        *head,
        (ldh, 0, 0, 2),  # A = UDP destination port
        (jeq, 0, 4, port),  # our port? else drop
        (ld, 0, 0, 8),  # A = payload bytes 0..3
        (jeq, 3, 0, magic),  # probe magic -> accept
        (ld, 0, 0, 12),  # A = payload bytes 4..7
        (jeq, 1, 0, stun.MAGIC_COOKIE),  # STUN cookie -> accept
        (ret, 0, 0, 0),  # drop
        (ret, 0, 0, 0xFFFF),  # accept
    ]


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _attach_filter(sock: socket.socket, port: int, *, ipv6: bool = False) -> None:
    prog = _bpf_program(port, ipv6=ipv6)
    insns = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
    fprog = _SockFprog(len(prog), insns)  # the kernel copies the program during setsockopt
    sock.setsockopt(
        socket.SOL_SOCKET, SO_ATTACH_FILTER, ctypes.string_at(ctypes.addressof(fprog), ctypes.sizeof(fprog))
    )


def udp_checksum(src: str, dst: str, segment: bytes) -> int:
    """RFC 768 checksum over the IPv4 pseudo-header and the UDP segment."""
    pseudo = (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(segment))
    )
    data = pseudo + segment + (b"\x00" if len(segment) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    csum = ~total & 0xFFFF
    return csum or 0xFFFF


def build_udp(src_port: int, dst: Endpoint, payload: bytes, src_ip: str | None = None) -> bytes:
    """A UDP header + payload. With ``src_ip`` the checksum is filled in, else left 0 (allowed in IPv4)."""
    length = 8 + len(payload)
    seg = _UDP_HEADER.pack(src_port, dst[1], length, 0) + payload
    if src_ip is None:
        return seg
    return _UDP_HEADER.pack(src_port, dst[1], length, udp_checksum(src_ip, dst[0], seg)) + payload


def parse_ipv4_udp(packet: bytes) -> tuple[Endpoint, Endpoint, bytes] | None:
    """(src, dst, payload) of an IPv4 packet carrying UDP, or None if it is anything else."""
    if len(packet) < 28 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl + 8 or packet[9] != socket.IPPROTO_UDP:
        return None
    sport, dport, length, _ = _UDP_HEADER.unpack_from(packet, ihl)
    payload = packet[ihl + 8 : ihl + max(8, length)]
    src = str(ipaddress.IPv4Address(packet[12:16]))
    dst = str(ipaddress.IPv4Address(packet[16:20]))
    return (src, sport), (dst, dport), payload


def parse_udp6(datagram: bytes) -> tuple[int, int, bytes] | None:
    """(source port, destination port, payload) of what a raw IPv6 UDP socket reads (no IP header)."""
    if len(datagram) < 8:
        return None
    sport, dport, length, _ = _UDP_HEADER.unpack_from(datagram)
    if length < 8:  # 0 means a jumbogram (RFC 2675): never ours
        return None
    return sport, dport, datagram[8:length]


def _open6(port: int) -> socket.socket | None:
    """The raw IPv6 socket, or None when this host has no IPv6 (logged: IPv4 carries on alone)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except OSError as e:  # EAFNOSUPPORT (ipv6.disable=1); a missing CAP_NET_RAW failed on IPv4 already
        log.info("no IPv6 on the WireGuard port (%s): IPv4 only", e)
        return None
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, UDP_CHECKSUM_OFFSET)
        _attach_filter(sock, port, ipv6=True)
        mark_underlay(sock)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class RawPort:
    """Raw sockets bound to the WireGuard listen port's traffic (non-blocking; the asyncio shell reads them).

    :meth:`send` writes ``payload`` to ``dst`` from ``port`` (over IPv6 for an IPv6 ``dst``); :meth:`recv`
    returns (src, payload) of one filtered datagram or None. ``ipv6=False`` opens the IPv4 socket only.
    """

    def __init__(self, port: int, *, ipv6: bool = True) -> None:
        self.port = port
        try:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        except PermissionError as e:
            raise RawPortError(f"raw socket needs root or CAP_NET_RAW: {e}") from None
        self.sock6: socket.socket | None = None
        try:
            _attach_filter(self.sock, port)
            mark_underlay(self.sock)
            self.sock.setblocking(False)
            if ipv6:
                self.sock6 = _open6(port)
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def filenos(self) -> list[int]:
        """Every socket to watch for readability (IPv4, and IPv6 when open)."""
        return [s.fileno() for s in (self.sock, self.sock6) if s is not None]

    def send(self, payload: bytes, dst: Endpoint, *, ttl: int | None = None) -> None:
        """``ttl``: this datagram's IP TTL instead of the system default."""
        # a destination from the network (a map's STUN port + 1, a peer's candidate) may be out of range:
        # that is this send's failure (RawPortError, which callers handle), not a struct.error that would
        # escape and end the NAT timer task
        if not 0 < dst[1] <= 65535 or len(payload) > 65535 - 8:
            raise RawPortError(f"cannot send {len(payload)} bytes to port {dst[1]}: out of range")
        if ":" in dst[0]:
            self._send6(payload, dst, ttl)
            return
        try:
            if ttl is None:
                self.sock.sendto(build_udp(self.port, dst, payload), (dst[0], 0))
            else:
                cmsg = [(socket.IPPROTO_IP, socket.IP_TTL, struct.pack("i", ttl))]
                self.sock.sendmsg([build_udp(self.port, dst, payload)], cmsg, 0, (dst[0], 0))
        except OSError as e:
            raise RawPortError(f"sending to {dst[0]}:{dst[1]} from port {self.port}: {e}") from None

    def _send6(self, payload: bytes, dst: Endpoint, ttl: int | None) -> None:
        if self.sock6 is None:
            raise RawPortError(f"cannot send to {format_endpoint(dst)}: no IPv6 on this host")
        # the kernel computes the checksum (IPV6_CHECKSUM), so the header goes out with 0 there
        segment = build_udp(self.port, dst, payload)
        try:
            if ttl is None:
                self.sock6.sendto(segment, (dst[0], 0))
            else:
                cmsg = [(socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, struct.pack("i", ttl))]
                self.sock6.sendmsg([segment], cmsg, 0, (dst[0], 0))
        except OSError as e:
            raise RawPortError(f"sending to {format_endpoint(dst)} from port {self.port}: {e}") from None

    def recv(self) -> tuple[Endpoint, bytes] | None:
        """One filtered datagram from either socket (IPv4 first), or None when both are drained."""
        got = self._recv4()
        return got if got is not None or self.sock6 is None else self._recv6(self.sock6)

    def _recv4(self) -> tuple[Endpoint, bytes] | None:
        while True:  # skip what is not ours (the filter should have kept it), but never block
            try:
                packet = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return None
            parsed = parse_ipv4_udp(packet)
            if parsed is not None and parsed[1][1] == self.port:
                src, _, payload = parsed
                return src, payload

    def _recv6(self, sock: socket.socket) -> tuple[Endpoint, bytes] | None:
        while True:
            try:
                datagram, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return None
            parsed = parse_udp6(datagram)
            if parsed is not None and parsed[1] == self.port:
                host = str(addr[0]).split("%", 1)[0]  # a link-local source's zone means nothing to a peer
                return (host, parsed[0]), parsed[2]

    def close(self) -> None:
        self.sock.close()
        if self.sock6 is not None:
            self.sock6.close()

    def __enter__(self) -> RawPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
