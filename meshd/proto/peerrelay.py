"""Peer relays (issue 14): the coordinator's assignments, carried as signed signals on the map stream.

A node an admin made a peer relay (``coordinator nodes relay NAME on``) serves UDP relay ports like a
region relay (:mod:`meshd.proto.relayport`), but nobody asks it for them: the coordinator picks the
pair, the ports and one secret per side, and tells the three nodes over their own map streams as a
``signal`` from node 0 (older meshd ignore it: it is no call-me-maybe). The payload is signed like a
map, by the coordinator's signing key for the recipient's node id, so neither another node nor a
stream replayed to another node can forge or redirect one::

    {"type": "peer_relay", "body": {...}, "key": <key id>, "sig": <Ed25519 over
        "meshvpn netmap v1\\npeer_relay <node id>\\n" + SHA-256(canonical JSON of body)>}

Bodies (``kind``):

* ``use`` (to each side): relay through node ``relay`` (``name``) at ``addr``:``port`` for ``peer``
  (WireGuard key), binding with ``secret``;
* ``drop`` (to each side): stop using a peer relay for ``peer``;
* ``serve`` (to the relay): the pair ``a``/``b``, each ``{key, node, port, secret}``;
* ``stop`` (to the relay): end the pair of keys ``a`` and ``b``.

Each body has ``at`` (unix seconds); a body older than :data:`MAX_AGE` is refused, so a captured one
cannot be replayed later. The relay tells each side when both are bound with a node signal
``{"type": "peer_relay_state", "peer": <key>, "flags": <PortFlags>}`` (the coordinator names the sender,
and a side takes it only from the relay its ``use`` named).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from meshd.proto import netmap
from meshd.proto.cert import key_id
from meshd.proto.encoding import b64decode, b64encode, canonical_json
from meshd.proto.relayport import KEY_LEN, SECRET_LEN, Assigned, PortFlags

TYPE = "peer_relay"
STATE_TYPE = "peer_relay_state"
MAX_AGE = 120.0  #: seconds a signed body stays valid (the coordinator re-sends every REFRESH)
REFRESH = 20.0


class PeerRelayError(ValueError):
    """A malformed or unverifiable peer-relay message; the text says what was wrong."""


@dataclass(frozen=True, slots=True)
class Use:
    peer: bytes  #: the other side's WireGuard key
    relay: int  #: the relay's node id
    name: str
    addr: str
    port: int
    secret: bytes = field(repr=False)
    at: float


@dataclass(frozen=True, slots=True)
class Drop:
    peer: bytes
    at: float


@dataclass(frozen=True, slots=True)
class Serve:
    a: Assigned
    b: Assigned
    at: float


@dataclass(frozen=True, slots=True)
class Stop:
    a: bytes
    b: bytes
    at: float


Body = Use | Drop | Serve | Stop


def _key(k: bytes) -> str:
    if len(k) != KEY_LEN:
        raise PeerRelayError(f"key of {len(k)} bytes, not {KEY_LEN}")
    return b64encode(k)


def _side_json(s: Assigned) -> dict[str, Any]:
    return {"key": _key(s.key), "node": s.node_id, "port": s.port, "secret": b64encode(s.secret)}


def body_to_json(b: Body) -> dict[str, Any]:
    if isinstance(b, Use):
        return {
            "kind": "use",
            "peer": _key(b.peer),
            "relay": b.relay,
            "name": b.name,
            "addr": b.addr,
            "port": b.port,
            "secret": b64encode(b.secret),
            "at": b.at,
        }
    if isinstance(b, Drop):
        return {"kind": "drop", "peer": _key(b.peer), "at": b.at}
    if isinstance(b, Serve):
        return {"kind": "serve", "a": _side_json(b.a), "b": _side_json(b.b), "at": b.at}
    return {"kind": "stop", "a": _key(b.a), "b": _key(b.b), "at": b.at}


def _get(o: Any, name: str, typ: type, where: str) -> Any:
    if not isinstance(o, dict):
        raise PeerRelayError(f"{where}: not an object")
    v = o.get(name)
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise PeerRelayError(f"{where}: {name} must be {typ.__name__}")
    return v


def _key_of(o: Any, name: str, where: str) -> bytes:
    try:
        return b64decode(_get(o, name, str, where), length=KEY_LEN, what=name)
    except ValueError as exc:
        raise PeerRelayError(f"{where}: {exc}") from None


def _port(o: Any, where: str) -> int:
    p: int = _get(o, "port", int, where)
    if not 0 < p <= 0xFFFF:
        raise PeerRelayError(f"{where}: port {p} not in 1..65535")
    return p


def _node(o: Any, name: str, where: str) -> int:
    n: int = _get(o, name, int, where)
    if not 0 < n < 1 << 62:
        raise PeerRelayError(f"{where}: {name} must be a node id")
    return n


def _secret(o: Any, where: str) -> bytes:
    try:
        return b64decode(_get(o, "secret", str, where), length=SECRET_LEN, what="secret")
    except ValueError as exc:
        raise PeerRelayError(f"{where}: {exc}") from None


def _side(o: Any, where: str) -> Assigned:
    return Assigned(_key_of(o, "key", where), _node(o, "node", where), _port(o, where), _secret(o, where))


def body_from_json(o: Any) -> Body:
    kind = _get(o, "kind", str, "peer_relay")
    at: float = _get(o, "at", float, "peer_relay")
    if kind == "use":
        name: str = _get(o, "name", str, "use")
        if not 0 < len(name) <= 63 or not name.isascii() or not name.isprintable():
            raise PeerRelayError("use: name must be 1-63 printable ASCII characters")
        addr: str = _get(o, "addr", str, "use")
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise PeerRelayError(f"use: addr {addr[:64]!r} is not an IP address") from None
        return Use(
            _key_of(o, "peer", "use"), _node(o, "relay", "use"), name, str(ip), _port(o, "use"),
            _secret(o, "use"), at,
        )  # fmt: skip
    if kind == "drop":
        return Drop(_key_of(o, "peer", "drop"), at)
    if kind == "serve":
        a, b = _side(o.get("a"), "serve.a"), _side(o.get("b"), "serve.b")
        if a.key == b.key or a.port == b.port:
            raise PeerRelayError("serve: the two sides must differ in key and port")
        return Serve(a, b, at)
    if kind == "stop":
        return Stop(_key_of(o, "a", "stop"), _key_of(o, "b", "stop"), at)
    raise PeerRelayError(f"peer_relay: unknown kind {kind[:32]!r}")


def encode(body: Body, node_id: int, key: SigningKey) -> dict[str, Any]:
    """The signal payload for ``node_id``, signed by the coordinator's ``key``."""
    text = canonical_json(body_to_json(body))
    signed = netmap.signed_bytes(TYPE, node_id, netmap.body_digest(text))
    return {
        "type": TYPE,
        "body": body_to_json(body),
        "key": key_id(bytes(key.verify_key)),
        "sig": b64encode(key.sign(signed).signature),
    }


def signer(payload: Any) -> str:
    """The key id a payload claims (PeerRelayError when it is no peer-relay payload)."""
    kid: str = _get(payload, "key", str, TYPE)
    if len(kid) != 16 or any(c not in "0123456789abcdef" for c in kid):
        raise PeerRelayError("peer_relay: key must be a 16-digit hex key id")
    return kid


def decode(payload: Any, node_id: int, trusted: Iterable[bytes], now: float) -> Body:
    """The body of a payload signed for ``node_id`` by one of ``trusted`` and younger than MAX_AGE."""
    if _get(payload, "type", str, TYPE) != TYPE:
        raise PeerRelayError("not a peer_relay payload")
    kid = signer(payload)
    public = {key_id(k): k for k in trusted}.get(kid)
    if public is None:
        raise PeerRelayError(f"peer_relay: signed by unknown key {kid}")
    raw = payload.get("body")
    try:
        text = canonical_json(raw)
        sig = b64decode(_get(payload, "sig", str, TYPE), length=64, what="sig")
    except (ValueError, TypeError, UnicodeEncodeError, RecursionError) as exc:
        raise PeerRelayError(f"peer_relay: {exc}") from None
    try:
        VerifyKey(public).verify(netmap.signed_bytes(TYPE, node_id, netmap.body_digest(text)), sig)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        raise PeerRelayError(f"peer_relay: signature does not verify for node {node_id}") from None
    body = body_from_json(raw)
    if abs(now - body.at) > MAX_AGE:
        raise PeerRelayError(f"peer_relay: {body.at:.0f} is more than {MAX_AGE:.0f} s from now")
    return body


def state_payload(peer: bytes, flags: PortFlags) -> dict[str, Any]:
    return {"type": STATE_TYPE, "peer": _key(peer), "flags": int(flags)}


def decode_state(payload: Any) -> tuple[bytes, PortFlags]:
    peer = _key_of(payload, "peer", STATE_TYPE)
    flags: int = _get(payload, "flags", int, STATE_TYPE)
    if flags not in (0, 1, 2, 3, 4):
        raise PeerRelayError(f"{STATE_TYPE}: unknown flags {flags}")
    return peer, PortFlags(flags)
