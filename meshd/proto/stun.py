"""STUN message codec and Binding transactions, sans-IO (RFC 8489, formerly RFC 5389).

Only what a mesh VPN needs is interpreted: the Binding method, XOR-MAPPED-ADDRESS (RFC 8489 §14.2),
MAPPED-ADDRESS (§14.1), SOFTWARE (§14.14), ERROR-CODE (§14.8), MESSAGE-INTEGRITY (§14.5, short-term
credentials, used by the RFC 5769 vectors), FINGERPRINT (§14.7) and OTHER-ADDRESS / RESPONSE-ORIGIN
(RFC 5780 §7.4/§7.3). Every other attribute is kept as raw bytes so messages round-trip unchanged.

Nothing here touches a socket or a clock: callers pass ``now`` (seconds, any monotonic origin) and move
the bytes themselves.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from meshd.proto.endpoint import Endpoint

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LEN = 20
FINGERPRINT_XOR = 0x5354554E  # RFC 8489 §14.7
MAX_MESSAGE = 1280  # larger datagrams are not STUN we will answer (keeps parsing bounded)


class StunError(ValueError):
    """A datagram is not a well-formed STUN message; the text says what was wrong and where."""


class Method(IntEnum):
    BINDING = 0x001


class Class(IntEnum):
    """Message class bits (RFC 8489 §5: C1 at bit 8, C0 at bit 4 of the type)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Attr(IntEnum):
    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


def message_type(method: int, cls: Class) -> int:
    """Interleave method and class bits into the 14-bit message type (RFC 8489 §5, Figure 3)."""
    m = method & 0xFFF
    c = int(cls)
    return ((m & 0xF80) << 2) | ((m & 0x070) << 1) | (m & 0x00F) | ((c & 0b10) << 7) | ((c & 0b01) << 4)


def split_type(t: int) -> tuple[int, Class]:
    """Inverse of :func:`message_type`."""
    method = ((t & 0x3E00) >> 2) | ((t & 0x00E0) >> 1) | (t & 0x000F)
    cls = Class(((t & 0x0100) >> 7) | ((t & 0x0010) >> 4))
    return method, cls


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded STUN message: attributes are (type, raw value) pairs in wire order."""

    method: int
    cls: Class
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...] = field(default=())

    def get(self, attr: int) -> bytes | None:
        """The first value of ``attr`` (RFC 8489 §14: later duplicates are ignored)."""
        for t, v in self.attributes:
            if t == attr:
                return v
        return None

    @property
    def xor_mapped_address(self) -> Endpoint | None:
        raw = self.get(Attr.XOR_MAPPED_ADDRESS)
        return None if raw is None else decode_address(raw, self.transaction_id, xor=True)

    @property
    def mapped_address(self) -> Endpoint | None:
        """XOR-MAPPED-ADDRESS, else the legacy MAPPED-ADDRESS (RFC 8489 §14.1)."""
        xma = self.xor_mapped_address
        if xma is not None:
            return xma
        raw = self.get(Attr.MAPPED_ADDRESS)
        return None if raw is None else decode_address(raw, self.transaction_id, xor=False)

    @property
    def other_address(self) -> Endpoint | None:
        raw = self.get(Attr.OTHER_ADDRESS)
        return None if raw is None else decode_address(raw, self.transaction_id, xor=False)

    @property
    def software(self) -> str | None:
        raw = self.get(Attr.SOFTWARE)
        return None if raw is None else raw.decode("utf-8", "replace")

    @property
    def error(self) -> tuple[int, str] | None:
        """ERROR-CODE as (code, reason) (RFC 8489 §14.8)."""
        raw = self.get(Attr.ERROR_CODE)
        if raw is None:
            return None
        if len(raw) < 4:
            raise StunError(f"ERROR-CODE truncated: {len(raw)} of at least 4 bytes")
        return (raw[2] & 0x7) * 100 + raw[3], raw[4:].decode("utf-8", "replace")


# -- addresses ------------------------------------------------------------------------------------------


def encode_address(addr: Endpoint, transaction_id: bytes, *, xor: bool) -> bytes:
    """(X)OR-MAPPED-ADDRESS value (RFC 8489 §14.1, §14.2)."""
    ip = ipaddress.ip_address(addr[0])
    port = addr[1]
    raw = ip.packed
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE_BYTES + transaction_id
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    family = 0x01 if ip.version == 4 else 0x02
    return struct.pack("!BBH", 0, family, port) + raw


def decode_address(value: bytes, transaction_id: bytes, *, xor: bool) -> Endpoint:
    """Inverse of :func:`encode_address`; raises StunError on a bad family or length."""
    if len(value) < 4:
        raise StunError(f"address attribute truncated: {len(value)} of at least 8 bytes")
    _, family, port = struct.unpack_from("!BBH", value)
    want = {0x01: 4, 0x02: 16}.get(family)
    if want is None:
        raise StunError(f"address family 0x{family:02x} unknown")
    raw = value[4:]
    if len(raw) != want:
        raise StunError(f"address attribute has {len(raw)} address bytes, family needs {want}")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE_BYTES + transaction_id
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    return str(ipaddress.ip_address(raw)), port


# -- codec ----------------------------------------------------------------------------------------------


def looks_like_stun(data: bytes) -> bool:
    """Cheap demultiplexing test (RFC 8489 §6.3; RFC 7983): top bits zero and the magic cookie present.

    WireGuard messages start with a type byte 1..4 followed by three zero bytes, so they never carry the
    cookie at offset 4 unless by chance; callers still run :func:`decode`.
    """
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and data[4:8] == _COOKIE_BYTES


def decode(data: bytes, *, integrity_key: bytes | None = None) -> Message:
    """Parse one STUN message (RFC 8489 §5, §14).

    FINGERPRINT, when present, must be last and must match (§14.7). MESSAGE-INTEGRITY is checked when
    ``integrity_key`` is given (§14.5); attributes after it other than FINGERPRINT are ignored (§14.5).
    Raises :class:`StunError` for anything malformed; never any other exception.
    """
    if len(data) < HEADER_LEN:
        raise StunError(f"header truncated: {len(data)} of 20 bytes")
    if len(data) > MAX_MESSAGE:
        raise StunError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    t, length = struct.unpack_from("!HH", data)
    if t & 0xC000:
        raise StunError("top two bits of the message type are not zero")
    if data[4:8] != _COOKIE_BYTES:
        raise StunError("magic cookie missing")
    if length % 4:
        raise StunError(f"message length {length} is not a multiple of 4")
    if HEADER_LEN + length != len(data):
        raise StunError(f"message length {length} disagrees with datagram body of {len(data) - HEADER_LEN}")
    method, cls = split_type(t)
    txid = bytes(data[8:20])
    attrs: list[tuple[int, bytes]] = []
    pos = HEADER_LEN
    integrity_at: int | None = None
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunError(f"attribute header at offset {pos} truncated")
        atype, alen = struct.unpack_from("!HH", data, pos)
        start = pos + 4
        end = start + alen
        if end > len(data):
            raise StunError(f"attribute 0x{atype:04x} truncated: {len(data) - start} of {alen} bytes")
        value = bytes(data[start:end])
        if atype == Attr.FINGERPRINT:
            if alen != 4:
                raise StunError(f"FINGERPRINT has length {alen}, not 4")
            if end != len(data):
                raise StunError("FINGERPRINT is not the last attribute")
            want = _fingerprint(data[:pos], len(data) - HEADER_LEN)
            if value != want:
                raise StunError("FINGERPRINT mismatch")
        elif integrity_at is not None:
            pass  # RFC 8489 §14.5: ignore everything after MESSAGE-INTEGRITY except FINGERPRINT
        elif atype == Attr.MESSAGE_INTEGRITY:
            if alen != 20:
                raise StunError(f"MESSAGE-INTEGRITY has length {alen}, not 20")
            integrity_at = pos
        if integrity_at is None or atype in (Attr.MESSAGE_INTEGRITY, Attr.FINGERPRINT):
            attrs.append((atype, value))
        pos = end + (-alen % 4)
    if pos != len(data):
        raise StunError("attribute padding runs past the end of the message")
    if integrity_key is not None:
        if integrity_at is None:
            raise StunError("MESSAGE-INTEGRITY missing")
        mac = data[integrity_at + 4 : integrity_at + 24]
        if not hmac.compare_digest(mac, _integrity(data[:integrity_at], integrity_at + 24, integrity_key)):
            raise StunError("MESSAGE-INTEGRITY mismatch")
    return Message(method, cls, txid, tuple(attrs))


def encode(msg: Message, *, integrity_key: bytes | None = None, fingerprint: bool = False) -> bytes:
    """Serialise ``msg``; optionally append MESSAGE-INTEGRITY and FINGERPRINT (RFC 8489 §14.5, §14.7).

    Attributes of those two types already in ``msg`` are dropped and recomputed when requested.
    """
    if len(msg.transaction_id) != 12:
        raise StunError(f"transaction id has {len(msg.transaction_id)} bytes, not 12")
    body = bytearray()
    for atype, value in msg.attributes:
        if (atype == Attr.MESSAGE_INTEGRITY and integrity_key is not None) or (
            atype == Attr.FINGERPRINT and fingerprint
        ):
            continue
        body += _attr(atype, value)
    header = struct.pack("!HH", message_type(msg.method, msg.cls), 0) + _COOKIE_BYTES + msg.transaction_id
    out = bytearray(header) + body
    if integrity_key is not None:
        mac = _integrity(bytes(out), len(out) + 24, integrity_key)
        out += _attr(Attr.MESSAGE_INTEGRITY, mac)
    if fingerprint:
        out += _attr(Attr.FINGERPRINT, _fingerprint(bytes(out), len(out) + 8 - HEADER_LEN))
    struct.pack_into("!H", out, 2, len(out) - HEADER_LEN)
    if len(out) > MAX_MESSAGE:
        raise StunError(f"message of {len(out)} bytes exceeds {MAX_MESSAGE}")
    return bytes(out)


def _attr(atype: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise StunError(f"attribute 0x{atype:04x} value too long")
    return struct.pack("!HH", atype, len(value)) + value + b"\x00" * (-len(value) % 4)


def _with_length(prefix: bytes, length: int) -> bytes:
    return prefix[:2] + struct.pack("!H", length) + prefix[4:]


def _integrity(prefix: bytes, end_of_integrity: int, key: bytes) -> bytes:
    """HMAC-SHA1 over the message up to MESSAGE-INTEGRITY with the length adjusted (RFC 8489 §14.5)."""
    return hmac.new(key, _with_length(prefix, end_of_integrity - HEADER_LEN), hashlib.sha1).digest()


def _fingerprint(prefix: bytes, total_length: int) -> bytes:
    """CRC-32 of the message up to FINGERPRINT XOR 0x5354554e (RFC 8489 §14.7)."""
    crc = binascii.crc32(_with_length(prefix, total_length)) ^ FINGERPRINT_XOR
    return struct.pack("!I", crc & 0xFFFFFFFF)


# -- Binding --------------------------------------------------------------------------------------------


def new_transaction_id() -> bytes:
    return os.urandom(12)


def binding_request(transaction_id: bytes, *, software: str | None = None) -> bytes:
    """A Binding request (RFC 8489 §3.1) with FINGERPRINT, so servers can demultiplex it."""
    attrs: tuple[tuple[int, bytes], ...] = ()
    if software:
        attrs = ((Attr.SOFTWARE, software.encode()),)
    return encode(Message(Method.BINDING, Class.REQUEST, transaction_id, attrs), fingerprint=True)


def binding_response(
    request: Message,
    observed: Endpoint,
    *,
    software: str | None = None,
    other_address: Endpoint | None = None,
    response_origin: Endpoint | None = None,
) -> bytes:
    """The success response to a Binding request: XOR-MAPPED-ADDRESS of where it came from (§14.2)."""
    txid = request.transaction_id
    attrs: list[tuple[int, bytes]] = [(Attr.XOR_MAPPED_ADDRESS, encode_address(observed, txid, xor=True))]
    if other_address is not None:
        attrs.append((Attr.OTHER_ADDRESS, encode_address(other_address, txid, xor=False)))
    if response_origin is not None:
        attrs.append((Attr.RESPONSE_ORIGIN, encode_address(response_origin, txid, xor=False)))
    if software:
        attrs.append((Attr.SOFTWARE, software.encode()))
    return encode(Message(Method.BINDING, Class.SUCCESS, txid, tuple(attrs)), fingerprint=True)


def error_response(request: Message, code: int, reason: str) -> bytes:
    """An error response (RFC 8489 §14.8), e.g. 420 for unknown comprehension-required attributes."""
    value = struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()
    msg = Message(request.method, Class.ERROR, request.transaction_id, ((Attr.ERROR_CODE, value),))
    return encode(msg, fingerprint=True)


def answer(
    data: bytes,
    src: Endpoint,
    *,
    software: str | None = None,
    other_address: Endpoint | None = None,
    local: Endpoint | None = None,
) -> bytes | None:
    """A STUN server's whole job for one datagram: the reply to send back to ``src``, or None.

    Binding requests get a success response; unknown comprehension-required attributes (type < 0x8000
    that we do not know) get a 420 (RFC 8489 §6.3.1.1); anything that is not a STUN request is ignored.
    """
    try:
        msg = decode(data)
    except StunError:
        return None
    if msg.cls != Class.REQUEST:
        return None
    if msg.method != Method.BINDING:
        return error_response(msg, 400, "Bad Request: unsupported method")
    known = {int(a) for a in Attr}
    unknown = [t for t, _ in msg.attributes if t < 0x8000 and t not in known]
    if unknown:
        return error_response(msg, 420, "Unknown Attribute")
    return binding_response(msg, src, software=software, other_address=other_address, response_origin=local)


# -- client transactions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindingSucceeded:
    """A Binding request to ``server`` was answered: our address as the server saw it."""

    server: Endpoint
    mapped: Endpoint
    rtt: float
    other_address: Endpoint | None = None


@dataclass(frozen=True, slots=True)
class BindingFailed:
    """A Binding request to ``server`` got an error or no answer after every retransmission."""

    server: Endpoint
    reason: str


BindingEvent = BindingSucceeded | BindingFailed


@dataclass(slots=True)
class _Txn:
    server: Endpoint
    request: bytes
    started: float
    next_send: float
    rto: float
    sent: int = 0


class BindingClient:
    """Binding transactions to any number of servers, with retransmission (RFC 8489 §6.2.1).

    Sans-IO: :meth:`query` starts a transaction, :meth:`datagrams_to_send` yields what to put on the wire
    (the caller sends it from the WireGuard port), :meth:`receive` takes any datagram that looks like STUN,
    :meth:`next_timer` / :meth:`handle_timer` drive retransmission, :meth:`next_event` drains results.
    The defaults (RTO 250 ms doubling, 5 sends, ~3.9 s) suit a daemon that must learn its address fast; the
    RFC's 500 ms / Rc=7 are available through the constructor.
    """

    def __init__(self, *, rto: float = 0.25, max_sends: int = 5, software: str | None = None) -> None:
        self._rto = rto
        self._max_sends = max_sends
        self._software = software
        self._txns: dict[bytes, _Txn] = {}
        self._events: list[BindingEvent] = []

    def query(self, server: Endpoint, now: float, transaction_id: bytes | None = None) -> bytes:
        """Start a Binding transaction towards ``server``; returns its transaction id."""
        txid = transaction_id or new_transaction_id()
        req = binding_request(txid, software=self._software)
        self._txns[txid] = _Txn(server, req, now, now, self._rto)
        return txid

    @property
    def pending(self) -> int:
        return len(self._txns)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out: list[tuple[bytes, Endpoint]] = []
        for txn in self._txns.values():
            if txn.next_send <= now and txn.sent < self._max_sends:
                out.append((txn.request, txn.server))
                txn.sent += 1
                txn.next_send = now + txn.rto
                txn.rto *= 2
        return out

    def receive(self, data: bytes, addr: Endpoint, now: float) -> bool:
        """Take a datagram; True when it answered one of our transactions."""
        try:
            msg = decode(data)
        except StunError:
            return False
        txn = self._txns.get(msg.transaction_id)
        if txn is None or msg.cls not in (Class.SUCCESS, Class.ERROR):
            return False
        del self._txns[msg.transaction_id]
        if msg.cls == Class.ERROR:
            # a malformed ERROR-CODE (shorter than its 4-byte header) is still a failed answer: reading it
            # must not raise out of here, where it would kill the caller's NAT timer task
            try:
                err = msg.error
            except StunError as e:
                self._events.append(BindingFailed(txn.server, f"malformed error response: {e}"))
                return True
            self._events.append(BindingFailed(txn.server, f"error response {err}"))
            return True
        try:
            mapped = msg.mapped_address
            other = msg.other_address
        except StunError as e:
            self._events.append(BindingFailed(txn.server, str(e)))
            return True
        if mapped is None:
            self._events.append(BindingFailed(txn.server, "response without a mapped address"))
        else:
            self._events.append(BindingSucceeded(txn.server, mapped, now - txn.started, other))
        return True

    def next_timer(self) -> float | None:
        times = [t.next_send for t in self._txns.values()]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Give up on transactions whose last retransmission went unanswered for one more RTO."""
        for txid, txn in list(self._txns.items()):
            if txn.sent >= self._max_sends and txn.next_send <= now:
                del self._txns[txid]
                self._events.append(BindingFailed(txn.server, f"no answer after {txn.sent} requests"))

    def next_event(self) -> BindingEvent | None:
        return self._events.pop(0) if self._events else None

    def events(self) -> Iterable[BindingEvent]:
        while (ev := self.next_event()) is not None:
            yield ev
