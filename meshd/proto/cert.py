"""Node certificates: a canonical JSON payload signed with the coordinator's Ed25519 key (RFC 8032).

Wire form: ``<base64url(payload)>.<base64url(signature)>`` (no padding), where payload is canonical JSON
(sorted keys, compact) of :class:`CertPayload`. Peers accept a certificate only when it verifies against a
trusted coordinator key (selected by the payload's ``issuer`` key id, so several keys can be trusted during
a rotation) and ``not_before <= now < not_after``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from meshd.proto.encoding import b64decode, canonical_json

CERT_VERSION = 1
MAX_CERT_CHARS = 8192


class CertError(ValueError):
    """A certificate is malformed or does not verify; the message says why (expired, bad signature, ...)."""


@dataclass(frozen=True, slots=True)
class CertPayload:
    """What a node certificate binds together."""

    version: int
    serial: int
    name: str
    node_id: int
    ips: tuple[str, ...]
    wg_public_key: str  #: base64 X25519 public key
    node_public_key: str  #: base64 Ed25519 public key
    tags: tuple[str, ...]
    not_before: int  #: unix seconds
    not_after: int  #: unix seconds
    issuer: str  #: key id of the signing coordinator key


def key_id(public_key: bytes) -> str:
    """Short identifier of a coordinator public key: the first 8 bytes of its SHA-256, hex."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def issue(payload: CertPayload, signing_key: bytes) -> str:
    """Sign `payload` with the coordinator's Ed25519 seed; `payload.issuer` must name that key."""
    key = SigningKey(signing_key)
    if payload.issuer != key_id(bytes(key.verify_key)):
        raise CertError("issuer does not match the signing key")
    signature = key.sign(payload_bytes(payload)).signature
    return assemble(payload, signature)


def payload_bytes(payload: CertPayload) -> bytes:
    """The bytes a certificate's signature covers: the canonical JSON of `payload`."""
    return canonical_json(_to_json(payload))


def assemble(payload: CertPayload, signature: bytes) -> str:
    """The wire form of a certificate from its payload and signature (a map carries the payload's
    fields once, in the peer record, and only the signature and validity: meshd.proto.netmap)."""
    return f"{_b64u(payload_bytes(payload))}.{_b64u(signature)}"


def decode(cert: str) -> tuple[CertPayload, bytes, bytes]:
    """Split and parse a certificate without verifying it: (payload, payload bytes, signature)."""
    if not isinstance(cert, str) or len(cert) > MAX_CERT_CHARS:
        raise CertError("malformed certificate: not a string of at most 8192 characters")
    parts = cert.split(".")
    if len(parts) != 2:
        raise CertError("malformed certificate: expected payload.signature")
    body = _unb64u(parts[0], "payload")
    signature = _unb64u(parts[1], "signature")
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CertError("malformed certificate: payload is not JSON") from None
    return _from_json(raw), body, signature


def verify(cert: str, trusted_keys: Iterable[bytes], now: float) -> CertPayload:
    """Return the payload if `cert` is signed by one of `trusted_keys` and valid at `now`, else CertError."""
    payload, body, signature = decode(cert)
    keys = {key_id(k): k for k in trusted_keys}
    public = keys.get(payload.issuer)
    if public is None:
        raise CertError(f"unknown issuer {payload.issuer}")
    try:
        VerifyKey(public).verify(body, signature)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        raise CertError("bad signature") from None
    if now < payload.not_before:
        raise CertError("not yet valid")
    if now >= payload.not_after:
        raise CertError("expired")
    return payload


def _to_json(payload: CertPayload) -> dict[str, Any]:
    out = asdict(payload)
    out["ips"] = list(payload.ips)
    out["tags"] = list(payload.tags)
    return out


_FIELDS: dict[str, type] = {
    "version": int,
    "serial": int,
    "name": str,
    "node_id": int,
    "ips": list,
    "wg_public_key": str,
    "node_public_key": str,
    "tags": list,
    "not_before": int,
    "not_after": int,
    "issuer": str,
}


def _from_json(raw: Any) -> CertPayload:
    if not isinstance(raw, dict):
        raise CertError("malformed certificate: payload is not an object")
    if set(raw) != set(_FIELDS):
        raise CertError("malformed certificate: unexpected or missing fields")
    for name, kind in _FIELDS.items():
        value = raw[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CertError(f"malformed certificate: field {name} must be {kind.__name__}")
    for name in ("ips", "tags"):
        if not all(isinstance(v, str) for v in raw[name]):
            raise CertError(f"malformed certificate: field {name} must be a list of strings")
    if raw["version"] != CERT_VERSION:
        raise CertError(f"unsupported certificate version {raw['version']}")
    for name in ("wg_public_key", "node_public_key"):
        try:
            b64decode(raw[name], length=32, what=name)
        except ValueError as exc:
            raise CertError(f"malformed certificate: {exc}") from None
    return CertPayload(
        version=raw["version"],
        serial=raw["serial"],
        name=raw["name"],
        node_id=raw["node_id"],
        ips=tuple(raw["ips"]),
        wg_public_key=raw["wg_public_key"],
        node_public_key=raw["node_public_key"],
        tags=tuple(raw["tags"]),
        not_before=raw["not_before"],
        not_after=raw["not_after"],
        issuer=raw["issuer"],
    )


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: str, what: str) -> bytes:
    if not text or not all(c.isalnum() or c in "-_" for c in text) or not text.isascii():
        raise CertError(f"malformed certificate: {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise CertError(f"malformed certificate: {what} is not base64url") from None
