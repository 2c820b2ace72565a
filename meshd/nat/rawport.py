"""Send and receive STUN and probe datagrams on the WireGuard port while WireGuard owns it (IPv4).

WireGuard holds the UDP socket bound to its listen port; we cannot bind it again. A raw
``IPPROTO_UDP`` socket can still *send* datagrams whose UDP source port is the WireGuard port (we write
the UDP header ourselves) and *receive* a copy of every UDP datagram the host gets. Because the packets
really leave from the WireGuard port, the NAT mapping STUN learns and the holes probes punch are the ones
WireGuard's own traffic uses.

A classic BPF filter attached to the socket keeps WireGuard's data packets in the kernel: only datagrams
to our port whose payload starts with the probe magic, or carries the STUN magic cookie at offset 4
(RFC 8489 §6), are copied to us. WireGuard also receives those datagrams and drops them as invalid.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket
import struct

from meshd.proto import disco, stun
from meshd.proto.endpoint import Endpoint

SO_ATTACH_FILTER = 26
SO_MARK = 36


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


def _bpf_program(port: int) -> list[tuple[int, int, int, int]]:
    """cBPF (code, jt, jf, k): accept UDP datagrams to ``port`` carrying probe magic or the STUN cookie.

    The raw socket delivers the IPv4 header, so the UDP header sits at 4*IHL (``ldx msh``). Jump offsets
    count from the next instruction.
    """
    magic = struct.unpack("!I", disco.MAGIC)[0]
    ldx_msh, ldh_ind, ld_ind, jeq, ret = 0xB1, 0x48, 0x40, 0x15, 0x06
    return [
        (ldx_msh, 0, 0, 0),  # 0: X = 4 * (IP[0] & 0xf)
        (ldh_ind, 0, 0, 2),  # 1: A = UDP destination port
        (jeq, 0, 4, port),  # 2: our port? else -> 7 (drop)
        (ld_ind, 0, 0, 8),  # 3: A = payload bytes 0..3
        (jeq, 3, 0, magic),  # 4: probe magic -> 8 (accept)
        (ld_ind, 0, 0, 12),  # 5: A = payload bytes 4..7
        (jeq, 1, 0, stun.MAGIC_COOKIE),  # 6: STUN cookie -> 8 (accept)
        (ret, 0, 0, 0),  # 7: drop
        (ret, 0, 0, 0xFFFF),  # 8: accept
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


def _attach_filter(sock: socket.socket, port: int) -> None:
    prog = _bpf_program(port)
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


class RawPort:
    """A raw socket bound to the WireGuard listen port's traffic (non-blocking; the asyncio shell reads it).

    :meth:`send` writes ``payload`` to ``dst`` from ``port``; :meth:`recv` returns (src, payload) of one
    filtered datagram or None.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        try:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        except PermissionError as e:
            raise RawPortError(f"raw socket needs root or CAP_NET_RAW: {e}") from None
        try:
            _attach_filter(self.sock, port)
            mark_underlay(self.sock)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, payload: bytes, dst: Endpoint, *, ttl: int | None = None) -> None:
        """``ttl``: this datagram's IP TTL instead of the system default."""
        # a destination from the network (a map's STUN port + 1, a peer's candidate) may be out of range:
        # that is this send's failure (RawPortError, which callers handle), not a struct.error that would
        # escape and end the NAT timer task
        if not 0 < dst[1] <= 65535 or len(payload) > 65535 - 8:
            raise RawPortError(f"cannot send {len(payload)} bytes to port {dst[1]}: out of range")
        try:
            if ttl is None:
                self.sock.sendto(build_udp(self.port, dst, payload), (dst[0], 0))
            else:
                cmsg = [(socket.IPPROTO_IP, socket.IP_TTL, struct.pack("i", ttl))]
                self.sock.sendmsg([build_udp(self.port, dst, payload)], cmsg, 0, (dst[0], 0))
        except OSError as e:
            raise RawPortError(f"sending to {dst[0]}:{dst[1]} from port {self.port}: {e}") from None

    def recv(self) -> tuple[Endpoint, bytes] | None:
        try:
            packet = self.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return None
        parsed = parse_ipv4_udp(packet)
        if parsed is None or parsed[1][1] != self.port:
            return None
        src, _, payload = parsed
        return src, payload

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
