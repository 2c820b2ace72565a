"""The standalone-relay feed: one WebSocket from ``coordinator relay serve`` to its coordinator, sans-IO.

The relay connects to ``FEED_PATH`` with ``Authorization: Bearer <relay secret>``; a wrong secret is
refused with close code :attr:`meshd.proto.netmap.CloseCode.UNAUTHORIZED`. Then each side sends JSON text
messages, one per WebSocket message, ``{"type": ..., ...}``:

coordinator -> relay
  ``keys`` (:class:`Keys`, the trusted ticket-signing keys) and ``valid`` (:class:`Valid`, the nodes
  allowed now with their current WireGuard keys) on connect, then ``revoke`` (:class:`Revoke`) the moment
  a node is removed or expired and ``rekeyed`` (:class:`Rekeyed`) the moment its WireGuard key rotates
  (sessions and tickets of its old key are refused from then on).
relay -> coordinator
  ``region`` (:class:`Region`: it joins the relay map) first, then ``open`` (:class:`SessionOpen`),
  ``attach`` (:class:`Attach`: a node made this region its home, published as ``relay_home``) and
  ``session`` (:class:`SessionRecord`, a finished session for the coordinator's audit trail). The
  coordinator binds the connection to the region its first message names (never 1, the embedded region,
  nor a region another live feed holds) and refuses the connection if it later speaks for another one.

:func:`encode` writes any message; :func:`decode_to_relay` / :func:`decode_to_coordinator` read what each
end may receive. Anything malformed (not JSON, wrong types, out of range, the other direction's message)
raises :class:`FeedError` and nothing else. Unknown fields are ignored, so either end may add some.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from meshd.proto.encoding import b64decode, b64encode
from meshd.proto.netmap import RelayRegion
from meshd.proto.relay import region_problem

FEED_PATH = "/api/v1/relay/feed"
#: A ``valid`` message lists every node allowed now with its WireGuard key (~60 bytes each): room for a
#: quarter of a million nodes.
MAX_MESSAGE_BYTES = 16 << 20
MAX_TRUSTED = 64  #: trusted signing keys (the active one plus keys in rotation overlap)
MAX_TEXT = 1024  #: reasons, region names, URLs, transport names
MAX_ID = (1 << 63) - 1  #: node and region ids are database integers
KEY_LEN = 32


class FeedError(ValueError):
    """A feed message is malformed; the message says what."""


# -- coordinator -> relay ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Keys:
    """The Ed25519 keys whose relay tickets the relay must accept (32 bytes each)."""

    trusted: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Valid:
    """Every node allowed to use the relay right now, with its current WireGuard key: sessions of any
    other node, or under another key, are dropped."""

    nodes: dict[int, bytes]

    @property
    def node_ids(self) -> frozenset[int]:
        return frozenset(self.nodes)


@dataclass(frozen=True, slots=True)
class Rekeyed:
    """A node's WireGuard key is now `key`: drop its sessions under any other key, refuse their tickets."""

    node_id: int
    key: bytes


@dataclass(frozen=True, slots=True)
class Revoke:
    """A node was removed or expired: drop its sessions and refuse its tickets from now on."""

    node_id: int
    reason: str


# -- relay -> coordinator ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Region:
    """The relay's region, as it should appear in the relay map."""

    region: RelayRegion


@dataclass(frozen=True, slots=True)
class Attach:
    """A node made this region its home."""

    node_id: int
    region_id: int


@dataclass(frozen=True, slots=True)
class SessionOpen:
    """A relay session started (audit)."""

    node_id: int
    region: str
    transport: str  #: "upgrade" or "websocket"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One finished relay session, for the audit trail (never payload). The embedded relay produces the
    same records, so this is also the hub's session type."""

    node_id: int
    key: bytes  #: the node's WireGuard key (not written to the audit trail)
    region: str
    transport: str
    opened: float  #: unix seconds
    duration: float  #: seconds
    rx_bytes: int  #: packet bytes the client sent us
    tx_bytes: int  #: packet bytes we delivered to it
    drops: int
    reason: str


ToRelay = Keys | Valid | Revoke | Rekeyed
ToCoordinator = Region | Attach | SessionOpen | SessionRecord
Message = ToRelay | ToCoordinator


def encode(msg: Message) -> str:
    """One feed message as JSON text."""
    body: dict[str, Any]
    if isinstance(msg, Keys):
        body = {"type": "keys", "trusted": [b64encode(k) for k in msg.trusted]}
    elif isinstance(msg, Valid):
        body = {"type": "valid", "nodes": [[i, b64encode(k)] for i, k in sorted(msg.nodes.items())]}
    elif isinstance(msg, Revoke):
        body = {"type": "revoke", "node_id": msg.node_id, "reason": msg.reason}
    elif isinstance(msg, Rekeyed):
        body = {"type": "rekeyed", "node_id": msg.node_id, "key": b64encode(msg.key)}
    elif isinstance(msg, Region):
        r = msg.region
        body = {"type": "region", "id": r.id, "name": r.name, "url": r.url, "stun_port": r.stun_port}
    elif isinstance(msg, Attach):
        body = {"type": "attach", "node_id": msg.node_id, "region_id": msg.region_id}
    elif isinstance(msg, SessionOpen):
        body = {"type": "open", "node_id": msg.node_id, "region": msg.region, "transport": msg.transport}
    else:
        record = {
            "node_id": msg.node_id,
            "key": b64encode(msg.key),
            "region": msg.region,
            "transport": msg.transport,
            "opened": msg.opened,
            "duration": msg.duration,
            "rx_bytes": msg.rx_bytes,
            "tx_bytes": msg.tx_bytes,
            "drops": msg.drops,
            "reason": msg.reason,
        }
        body = {"type": "session", "record": record}
    return json.dumps(body)


def decode(data: str | bytes) -> Message:
    """Any feed message (either direction)."""
    o = _load(data)
    kind = o.get("type")
    if kind == "keys":
        keys = _get(o, "trusted", list, "keys")
        if len(keys) > MAX_TRUSTED:
            raise FeedError(f"keys: more than {MAX_TRUSTED} trusted keys")
        return Keys(tuple(_key(k, "keys: trusted key") for k in keys))
    if kind == "valid":
        nodes: dict[int, bytes] = {}
        for pair in _get(o, "nodes", list, "valid"):
            if not isinstance(pair, list) or len(pair) != 2:
                raise FeedError("valid: each node must be [id, key]")
            nodes[_id(pair[0], "valid: node id")] = _key(pair[1], "valid: node key")
        return Valid(nodes)
    if kind == "revoke":
        return Revoke(_id(o.get("node_id"), "revoke: node_id"), _text(o, "reason", "revoke"))
    if kind == "rekeyed":
        return Rekeyed(_id(o.get("node_id"), "rekeyed: node_id"), _key(o.get("key"), "rekeyed: key"))
    if kind == "region":
        region = RelayRegion(
            _id(o.get("id"), "region: id"),
            _text(o, "name", "region"),
            _text(o, "url", "region"),
            _get(o, "stun_port", int, "region"),
        )
        if (problem := region_problem(region.id, region.name, region.url, region.stun_port)) is not None:
            raise FeedError(f"region: {problem}")
        return Region(region)
    if kind == "attach":
        return Attach(_id(o.get("node_id"), "attach: node_id"), _id(o.get("region_id"), "attach: region_id"))
    if kind == "open":
        return SessionOpen(
            _id(o.get("node_id"), "open: node_id"), _text(o, "region", "open"), _text(o, "transport", "open")
        )
    if kind == "session":
        r = _get(o, "record", dict, "session")
        return SessionRecord(
            node_id=_id(r.get("node_id"), "session: node_id"),
            key=_key(r.get("key"), "session: key"),
            region=_text(r, "region", "session"),
            transport=_text(r, "transport", "session"),
            opened=_seconds(r, "opened"),
            duration=_seconds(r, "duration"),
            rx_bytes=_id(r.get("rx_bytes"), "session: rx_bytes"),
            tx_bytes=_id(r.get("tx_bytes"), "session: tx_bytes"),
            drops=_id(r.get("drops"), "session: drops"),
            reason=_text(r, "reason", "session"),
        )
    raise FeedError(f"unknown message type {str(kind)[:40]!r}")


def decode_to_relay(data: str | bytes) -> ToRelay:
    """What a standalone relay may receive from its coordinator."""
    msg = decode(data)
    if not isinstance(msg, Keys | Valid | Revoke | Rekeyed):
        raise FeedError(f"{type(msg).__name__} is not a coordinator -> relay message")
    return msg


def decode_to_coordinator(data: str | bytes) -> ToCoordinator:
    """What the coordinator may receive from a standalone relay."""
    msg = decode(data)
    if not isinstance(msg, Region | Attach | SessionOpen | SessionRecord):
        raise FeedError(f"{type(msg).__name__} is not a relay -> coordinator message")
    return msg


# -- strict field readers ---------------------------------------------------------------------------------
def _load(data: str | bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise FeedError(f"message larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and over-long integers too
        raise FeedError("message is not JSON") from None
    if not isinstance(raw, dict):
        raise FeedError("message is not a JSON object")
    return raw


def _get(o: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = o.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FeedError(f"{where}: field {key} must be {kind.__name__}")
    return value


def _id(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ID:
        raise FeedError(f"{what} must be a non-negative integer")
    return value


def _text(o: dict[str, Any], key: str, where: str) -> str:
    value = _get(o, key, str, where)
    if len(value) > MAX_TEXT:
        raise FeedError(f"{where}: field {key} longer than {MAX_TEXT} characters")
    return str(value)


def _key(value: Any, what: str) -> bytes:
    try:
        return b64decode(value, length=KEY_LEN, what=what)
    except ValueError as exc:
        raise FeedError(str(exc)) from None


def _seconds(o: dict[str, Any], key: str) -> float:
    value: Any = o.get(key)
    # an int is bounded before float() (a 400-digit integer would overflow it); 1e400 parses as inf
    ok = (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID) or (
        isinstance(value, float) and math.isfinite(value) and value >= 0
    )
    if not ok:
        raise FeedError(f"session: field {key} must be a non-negative number of seconds")
    return float(value)
