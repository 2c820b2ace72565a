"""NAT-PMP (RFC 6886) and PCP (RFC 6887) port-mapping messages, sans-IO codecs.

Both speak UDP to the default gateway's port 5351. A PCP server (miniupnpd among them) answers a NAT-PMP
(version 0) request in NAT-PMP, and a NAT-PMP-only router answers a PCP request with result 1
(UNSUPP_VERSION) in NAT-PMP form (RFC 6887 §9); :func:`decode_response` accepts either.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

PORT = 5351
NATPMP_VERSION = 0
PCP_VERSION = 2
MAX_LEN = 1100  # RFC 6887 §7: PCP messages are at most 1100 bytes


class PortMapError(ValueError):
    """A NAT-PMP/PCP message is malformed; the text says what and where."""


class Proto(IntEnum):
    """IANA protocol numbers as PCP uses them; NAT-PMP opcodes are 1 (UDP) and 2 (TCP)."""

    UDP = 17
    TCP = 6


class NatPmpResult(IntEnum):
    """RFC 6886 §3.5."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


class PcpResult(IntEnum):
    """RFC 6887 §7.4."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


class PcpOpcode(IntEnum):
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


# -- requests -------------------------------------------------------------------------------------------


def natpmp_external_address_request() -> bytes:
    """RFC 6886 §3.2: version 0, opcode 0."""
    return bytes([NATPMP_VERSION, 0])


def natpmp_map_request(proto: Proto, internal_port: int, external_port: int, lifetime: int) -> bytes:
    """RFC 6886 §3.3 (lifetime 0 and external port 0 delete the mapping, §3.4)."""
    opcode = 1 if proto == Proto.UDP else 2
    return struct.pack("!BBHHHI", NATPMP_VERSION, opcode, 0, internal_port, external_port, lifetime)


def _v6(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{addr}").packed
    return addr.packed


def _from_v6(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)


def pcp_announce_request(client_ip: str) -> bytes:
    """RFC 6887 §14.1: ANNOUNCE (opcode 0, lifetime 0): a probe that maps nothing."""
    return struct.pack("!BBHI", PCP_VERSION, PcpOpcode.ANNOUNCE, 0, 0) + _v6(client_ip)


def pcp_map_request(
    client_ip: str,
    nonce: bytes,
    proto: Proto,
    internal_port: int,
    lifetime: int,
    *,
    suggested_port: int = 0,
    suggested_ip: str = "0.0.0.0",
) -> bytes:
    """RFC 6887 §7.1 common header + §11.1 MAP payload. ``client_ip`` is our address facing the server."""
    if len(nonce) != 12:
        raise PortMapError(f"mapping nonce has {len(nonce)} bytes, not 12")
    header = struct.pack("!BBHI", PCP_VERSION, PcpOpcode.MAP, 0, lifetime) + _v6(client_ip)
    body = nonce + struct.pack("!B3xHH", proto, internal_port, suggested_port) + _v6(suggested_ip)
    return header + body


# -- responses ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExternalAddress:
    """NAT-PMP external address response (RFC 6886 §3.2)."""

    result: int
    epoch: int
    address: str


@dataclass(frozen=True, slots=True)
class Mapping:
    """A mapping response from either protocol; ``protocol`` is "natpmp" or "pcp".

    ``external_ip`` is None for NAT-PMP (ask with the external address request); ``nonce`` is None for it.
    """

    protocol: str
    result: int
    epoch: int
    proto: Proto
    internal_port: int
    external_port: int
    lifetime: int
    external_ip: str | None = None
    nonce: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.result == 0


@dataclass(frozen=True, slots=True)
class Announce:
    """PCP ANNOUNCE response (RFC 6887 §14.1): also how a server signals a restart (epoch)."""

    result: int
    epoch: int


Response = ExternalAddress | Mapping | Announce


def decode_response(data: bytes) -> Response:
    """Parse a NAT-PMP or PCP response; raises PortMapError for anything else."""
    if len(data) < 2:
        raise PortMapError(f"response truncated: {len(data)} bytes")
    if len(data) > MAX_LEN:
        raise PortMapError(f"response of {len(data)} bytes exceeds {MAX_LEN}")
    if data[0] == NATPMP_VERSION:
        return _decode_natpmp(data)
    if data[0] == PCP_VERSION:
        return _decode_pcp(data)
    raise PortMapError(f"unknown version {data[0]}")


def _decode_natpmp(data: bytes) -> Response:
    op = data[1]
    if op < 128:
        raise PortMapError(f"NAT-PMP opcode {op} is a request, not a response")
    if len(data) < 8:
        raise PortMapError(f"NAT-PMP response truncated: {len(data)} of at least 8 bytes")
    result, epoch = struct.unpack_from("!HI", data, 2)
    if op == 128:
        if len(data) < 12:
            if result != 0:
                return ExternalAddress(result, epoch, "0.0.0.0")
            raise PortMapError(f"NAT-PMP address response truncated: {len(data)} of 12 bytes")
        return ExternalAddress(result, epoch, str(ipaddress.IPv4Address(data[8:12])))
    if op in (129, 130):
        proto = Proto.UDP if op == 129 else Proto.TCP
        if len(data) < 16:
            if result != 0:
                return Mapping("natpmp", result, epoch, proto, 0, 0, 0)
            raise PortMapError(f"NAT-PMP mapping response truncated: {len(data)} of 16 bytes")
        internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
        return Mapping("natpmp", result, epoch, proto, internal, external, lifetime)
    raise PortMapError(f"NAT-PMP response opcode {op} unknown")


def _decode_pcp(data: bytes) -> Response:
    if len(data) < 24:
        raise PortMapError(f"PCP response truncated: {len(data)} of at least 24 bytes")
    if len(data) % 4:
        raise PortMapError(f"PCP response length {len(data)} is not a multiple of 4")
    r_op, _, result, lifetime, epoch = struct.unpack_from("!BBBII", data, 1)
    if not r_op & 0x80:
        raise PortMapError("PCP message is a request (R bit clear)")
    op = r_op & 0x7F
    if op == PcpOpcode.ANNOUNCE:
        return Announce(result, epoch)
    if op == PcpOpcode.MAP:
        if len(data) < 60:
            if result != 0:
                return Mapping("pcp", result, epoch, Proto.UDP, 0, 0, lifetime)
            raise PortMapError(f"PCP MAP response truncated: {len(data)} of 60 bytes")
        nonce = bytes(data[24:36])
        proto_num, internal, external = struct.unpack_from("!B3xHH", data, 36)
        try:
            proto = Proto(proto_num)
        except ValueError:
            raise PortMapError(f"PCP MAP response for protocol {proto_num}") from None
        ext_ip = _from_v6(bytes(data[44:60]))
        return Mapping("pcp", result, epoch, proto, internal, external, lifetime, ext_ip, nonce)
    raise PortMapError(f"PCP response opcode {op} unsupported")


def epoch_says_restarted(
    prev_epoch: int, prev_local: float, epoch: int, local: float, *, slack: float = 2.0
) -> bool:
    """RFC 6886 §3.6 / RFC 6887 §8.5: the server lost its state when its epoch clock ran slower than ours.

    Expected epoch >= prev_epoch + 7/8 of our elapsed time (minus slack); a smaller one means a restart
    and every mapping must be re-created.
    """
    elapsed = max(0.0, local - prev_local)
    return epoch < prev_epoch or epoch + slack < prev_epoch + elapsed * 7 / 8
