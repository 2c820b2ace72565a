"""Relay tickets: "node N, node key P, WireGuard key K may use relay region R until T", signed by the
coordinator.

Same envelope as node certificates (:mod:`meshd.proto.cert`): ``<base64url(payload)>.<base64url(sig)>``
where payload is canonical JSON of :class:`TicketPayload` and the signature is Ed25519 (RFC 8032 §5.1.6)
by the coordinator key named by ``issuer``. Tickets are short-lived (:data:`TICKET_LIFETIME`).

A ticket is not a bearer token: the relay checks the signature, the validity window, that the ticket is
for its own region, that the key in the client hello is the ticket's WireGuard key, and that the hello
carries a signature by the ticket's node key (``node_public_key``) over the relay's fresh challenge
(:func:`meshd.proto.relay.hello_transcript`). Whoever captures a ticket (on the wire, or as the operator
of a standalone relay) can therefore not use it: the node's Ed25519 key never leaves the node.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from meshd.proto.cert import CertError as _CertError
from meshd.proto.cert import _b64u, _unb64u, key_id
from meshd.proto.encoding import b64decode, canonical_json

TICKET_VERSION = 2  #: 2: node key and region id (1 was a bearer token for every region)
TICKET_LIFETIME = 300  #: seconds
MAX_TICKET_CHARS = 2048


class TicketError(ValueError):
    """A ticket is malformed, expired or does not verify; the message says which."""


@dataclass(frozen=True, slots=True)
class TicketPayload:
    version: int
    node_id: int
    node_public_key: str  #: base64 Ed25519 key that must sign the relay's challenge (the node key)
    wg_public_key: str  #: base64 X25519 public key the ticket is for
    region_id: int  #: the only relay region that accepts it
    not_before: int  #: unix seconds
    not_after: int  #: unix seconds
    issuer: str  #: key id of the signing coordinator key

    @property
    def key(self) -> bytes:
        return b64decode(self.wg_public_key, length=32, what="wg_public_key")

    @property
    def node_key(self) -> bytes:
        return b64decode(self.node_public_key, length=32, what="node_public_key")


@dataclass(frozen=True, slots=True)
class Grant:
    """What a relay client needs to open a session at one region: the ticket, its expiry, and a signer
    that signs the relay's challenge with the node key (the key stays with whoever made the signer)."""

    ticket: str = field(repr=False)
    not_after: float  #: unix seconds
    sign: Callable[[bytes], bytes] = field(repr=False, compare=False)


def issue(payload: TicketPayload, signing_key: bytes) -> str:
    """Sign `payload` with the coordinator's Ed25519 seed; `payload.issuer` must name that key."""
    key = SigningKey(signing_key)
    if payload.issuer != key_id(bytes(key.verify_key)):
        raise TicketError("issuer does not match the signing key")
    body = canonical_json(asdict(payload))
    return f"{_b64u(body)}.{_b64u(key.sign(body).signature)}"


def make(
    node_id: int,
    node_public_key: str,
    wg_public_key: str,
    region_id: int,
    signing_key: bytes,
    now: float,
    lifetime: int = TICKET_LIFETIME,
) -> str:
    """A fresh ticket for one region, valid from a little before `now` (clock skew) for `lifetime` s."""
    issuer = key_id(bytes(SigningKey(signing_key).verify_key))
    start = int(now)
    payload = TicketPayload(
        TICKET_VERSION,
        node_id,
        node_public_key,
        wg_public_key,
        region_id,
        start - 30,
        start + lifetime,
        issuer,
    )
    return issue(payload, signing_key)


def decode(ticket: str) -> tuple[TicketPayload, bytes, bytes]:
    """Parse without verifying: (payload, payload bytes, signature)."""
    if not isinstance(ticket, str) or len(ticket) > MAX_TICKET_CHARS:
        raise TicketError(f"malformed ticket: not a string of at most {MAX_TICKET_CHARS} characters")
    parts = ticket.split(".")
    if len(parts) != 2:
        raise TicketError("malformed ticket: expected payload.signature")
    try:
        body = _unb64u(parts[0], "payload")
        signature = _unb64u(parts[1], "signature")
    except _CertError as exc:
        raise TicketError(str(exc).replace("certificate", "ticket")) from None
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise TicketError("malformed ticket: payload is not JSON") from None
    return _from_json(raw), body, signature


def verify(ticket: str | bytes, trusted_keys: Iterable[bytes], now: float) -> TicketPayload:
    """The payload if `ticket` is signed by one of `trusted_keys` and valid at `now`, else TicketError."""
    if isinstance(ticket, bytes):
        try:
            ticket = ticket.decode("ascii")
        except UnicodeDecodeError:
            raise TicketError("malformed ticket: not ASCII") from None
    payload, body, signature = decode(ticket)
    keys = {key_id(k): k for k in trusted_keys}
    public = keys.get(payload.issuer)
    if public is None:
        raise TicketError(f"ticket from unknown issuer {payload.issuer}")
    try:
        VerifyKey(public).verify(body, signature)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        raise TicketError("ticket has a bad signature") from None
    if now < payload.not_before:
        raise TicketError("ticket not yet valid")
    if now >= payload.not_after:
        raise TicketError("ticket expired")
    return payload


_FIELDS: dict[str, type] = {
    "version": int,
    "node_id": int,
    "node_public_key": str,
    "wg_public_key": str,
    "region_id": int,
    "not_before": int,
    "not_after": int,
    "issuer": str,
}


def _from_json(raw: Any) -> TicketPayload:
    if not isinstance(raw, dict) or set(raw) != set(_FIELDS):
        raise TicketError("malformed ticket: unexpected or missing fields")
    for name, kind in _FIELDS.items():
        value = raw[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TicketError(f"malformed ticket: field {name} must be {kind.__name__}")
    if raw["version"] != TICKET_VERSION:
        raise TicketError(f"unsupported ticket version {raw['version']}")
    try:
        b64decode(raw["wg_public_key"], length=32, what="wg_public_key")
        b64decode(raw["node_public_key"], length=32, what="node_public_key")
    except ValueError as exc:
        raise TicketError(f"malformed ticket: {exc}") from None
    return TicketPayload(**raw)
