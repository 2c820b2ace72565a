"""Sans-IO codec for the WireGuard cross-platform userspace API (UAPI).

Specification: https://www.wireguard.com/xplatform/ ("Configuration Protocol"). A request is
``get=1\\n\\n`` or ``set=1\\n`` followed by ``key=value`` lines and an empty line. Every reply is
``key=value`` lines ending with ``errno=N`` and an empty line; N != 0 means failure (wireguard-go sends a
negative errno, e.g. ``errno=-22``). Keys travel as 64 hex digits; endpoints as ``IP:port`` /
``[IPv6]:port``; allowed IPs as CIDR.

No sockets here: `encode_get` / `encode_set` build request bytes, `reply_complete` tells a reader when to
stop reading, `decode_get` / `decode_set` turn a whole reply into values or raise UapiError. Any input text
raises nothing but UapiError.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence

from meshd.proto.endpoint import Endpoint, format_endpoint
from meshd.wg.diff import AddPeer, DeviceOp, RemovePeer, SetDevice, UpdatePeer
from meshd.wg.errors import UapiError, WgConfigError
from meshd.wg.keys import ZERO_KEY_B64, b64_to_hex, hex_to_b64, public_key
from meshd.wg.model import (
    InterfaceState,
    PeerState,
    canonical_networks,
    parse_endpoint,
)

GET_REQUEST = b"get=1\n\n"
MAX_REPLY = 64 * 1024 * 1024  #: a reader gives up beyond this many bytes (a huge peer list is ~200 B/peer)


def encode_get() -> bytes:
    """The ``get=1`` request."""
    return GET_REQUEST


def encode_set(ops: Sequence[DeviceOp]) -> bytes:
    """One ``set=1`` request applying `ops` (device settings first, then peers in order).

    Peers use ``update_only=true`` for updates, ``remove=true`` for removals and
    ``replace_allowed_ips=true`` whenever allowed IPs are given, so the result is exact and never
    depends on what was there before. ``replace_peers`` is never sent: untouched peers stay as they are.
    """
    lines = ["set=1"]
    for op in ops:
        if isinstance(op, SetDevice):
            if op.private_key is not None:
                lines.append(f"private_key={b64_to_hex(op.private_key, 'private key')}")
            if op.listen_port is not None:
                lines.append(f"listen_port={op.listen_port}")
            if op.fwmark is not None:
                lines.append(f"fwmark={op.fwmark}")
    for op in ops:
        if isinstance(op, RemovePeer):
            lines += [f"public_key={b64_to_hex(op.public_key)}", "remove=true"]
        elif isinstance(op, AddPeer):
            p = op.peer
            lines.append(f"public_key={b64_to_hex(p.public_key)}")
            if p.preshared_key is not None:
                lines.append(f"preshared_key={b64_to_hex(p.preshared_key)}")
            if p.endpoint is not None:
                lines.append(f"endpoint={format_endpoint(p.endpoint)}")
            lines.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
            lines.append("replace_allowed_ips=true")
            lines += [f"allowed_ip={net}" for net in p.allowed_ips]
        elif isinstance(op, UpdatePeer):
            lines += [f"public_key={b64_to_hex(op.public_key)}", "update_only=true"]
            if op.preshared_key is not None:
                lines.append(f"preshared_key={b64_to_hex(op.preshared_key)}")
            if op.endpoint is not None:
                lines.append(f"endpoint={format_endpoint(op.endpoint)}")
            if op.persistent_keepalive is not None:
                lines.append(f"persistent_keepalive_interval={op.persistent_keepalive}")
            if op.allowed_ips is not None:
                lines.append("replace_allowed_ips=true")
                lines += [f"allowed_ip={net}" for net in op.allowed_ips]
    # the protocol is line-based: one value holding a newline or other control character would become
    # extra lines (``remove=true``, another ``endpoint=``); no valid value has one, so refuse the request
    for line in lines:
        if not line.isascii() or not line.isprintable():
            raise WgConfigError(f"UAPI value {line!r} holds a control or non-ASCII character")
    return ("\n".join(lines) + "\n\n").encode()


def reply_complete(buffer: bytes) -> bool:
    """True once `buffer` holds a whole reply (it ends with an empty line)."""
    return buffer.endswith(b"\n\n") or buffer == b"\n"


def decode_set(reply: bytes) -> None:
    """Check a ``set=1`` reply; raise UapiError for ``errno != 0`` or malformed text."""
    _pairs_checked(reply)


def decode_get(reply: bytes, name: str) -> InterfaceState:
    """Decode a ``get=1`` reply into an InterfaceState for interface `name`."""
    pairs = _pairs_checked(reply)
    device: dict[str, int | str | None] = {"public_key": None, "listen_port": 0, "fwmark": 0}
    peers: list[PeerState] = []
    peer: _PeerBuilder | None = None
    for lineno, (key, value) in enumerate(pairs, start=1):
        where = f"line {lineno} ({key})"
        if key == "public_key":
            if peer is not None:
                peers.append(peer.build())
            peer = _PeerBuilder(_key(value, where))
        elif peer is None:
            if key == "private_key":
                device["public_key"] = _public_of_private_hex(value, where)
            elif key == "listen_port":
                device["listen_port"] = _uint(value, 16, where)
            elif key == "fwmark":
                device["fwmark"] = _uint(value, 32, where)
        else:
            peer.set(key, value, where)
    if peer is not None:
        peers.append(peer.build())
    listen_port, fwmark, pub = device["listen_port"], device["fwmark"], device["public_key"]
    assert isinstance(listen_port, int) and isinstance(fwmark, int)
    assert pub is None or isinstance(pub, str)
    return InterfaceState(
        name=name, public_key=pub, listen_port=listen_port, fwmark=fwmark, peers=tuple(peers)
    )


class _PeerBuilder:
    def __init__(self, public_key: str) -> None:
        self.public_key = public_key
        self.preshared_key: str | None = None
        self.endpoint: Endpoint | None = None
        self.allowed: list[str] = []
        self.hs_sec = 0
        self.hs_nsec = 0
        self.rx = 0
        self.tx = 0
        self.keepalive = 0

    def set(self, key: str, value: str, where: str) -> None:
        if key == "preshared_key":
            psk = _key(value, where)
            self.preshared_key = None if psk == ZERO_KEY_B64 else psk
        elif key == "endpoint":
            try:
                self.endpoint = parse_endpoint(value)
            except WgConfigError as e:
                raise UapiError(f"{where}: {e}") from None
        elif key == "allowed_ip":
            try:
                ipaddress.ip_network(value, strict=False)
                if "/" not in value:
                    raise ValueError
            except ValueError:
                raise UapiError(f"{where}: {value!r} is not a CIDR network") from None
            self.allowed.append(value)
        elif key == "last_handshake_time_sec":
            self.hs_sec = _uint(value, 64, where)
        elif key == "last_handshake_time_nsec":
            self.hs_nsec = _uint(value, 64, where)
        elif key == "rx_bytes":
            self.rx = _uint(value, 64, where)
        elif key == "tx_bytes":
            self.tx = _uint(value, 64, where)
        elif key == "persistent_keepalive_interval":
            self.keepalive = _uint(value, 16, where)
        # protocol_version and keys added by later versions are ignored on purpose

    def build(self) -> PeerState:
        handshake = None if self.hs_sec == 0 and self.hs_nsec == 0 else self.hs_sec + self.hs_nsec / 1e9
        return PeerState(
            public_key=self.public_key,
            endpoint=self.endpoint,
            allowed_ips=canonical_networks(self.allowed),
            last_handshake=handshake,
            rx_bytes=self.rx,
            tx_bytes=self.tx,
            persistent_keepalive=self.keepalive,
            preshared_key=self.preshared_key,
        )


def _pairs_checked(reply: bytes) -> list[tuple[str, str]]:
    """Split a whole reply into (key, value) pairs before ``errno``; raise on errno != 0."""
    try:
        text = reply.decode("ascii")
    except UnicodeDecodeError:
        raise UapiError("UAPI reply is not ASCII text") from None
    if not text.endswith("\n\n"):
        raise UapiError("UAPI reply is truncated (no terminating empty line)")
    lines = text[:-2].split("\n")
    pairs: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, start=1):
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise UapiError(f"UAPI reply line {lineno} is not key=value: {line[:40]!r}")
        pairs.append((key, value))
    key, value = pairs[-1]
    if key != "errno":
        raise UapiError("UAPI reply does not end with errno=N")
    try:
        if len(value) > 12:
            raise ValueError
        errno = int(value)
    except ValueError:
        raise UapiError(f"UAPI reply has a non-numeric errno: {value[:20]!r}") from None
    if errno != 0:
        reason = os.strerror(abs(errno)) if abs(errno) < 4096 else "unknown error"
        raise UapiError(f"wireguard-go refused the request: errno={errno} ({reason})", errno=errno)
    if any(k == "errno" for k, _ in pairs[:-1]):
        raise UapiError("UAPI reply has errno before its end")
    return pairs[:-1]


def _uint(value: str, bits: int, where: str) -> int:
    if not (value.isascii() and value.isdigit() and len(value) <= 20) or int(value) >= 1 << bits:
        raise UapiError(f"{where}: {value[:30]!r} is not an unsigned {bits}-bit integer")
    return int(value)


def _key(value: str, where: str) -> str:
    try:
        if not all(c in "0123456789abcdefABCDEF" for c in value):
            raise ValueError
        return hex_to_b64(value)
    except ValueError:
        raise UapiError(f"{where}: not a 64-digit hex key") from None


def _public_of_private_hex(value: str, where: str) -> str | None:
    private = _key(value, where)
    return None if private == ZERO_KEY_B64 else public_key(private)
