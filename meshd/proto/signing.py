"""Signed node requests and enrollment proofs (pure functions, no clock: callers pass `now`).

Every request a node makes after enrollment carries four headers::

    X-Mesh-Node: <node id>            X-Mesh-Timestamp: <unix seconds>
    X-Mesh-Nonce: <32 hex chars>      X-Mesh-Signature: <base64 Ed25519 signature, RFC 8032 §5.1>

The signature covers ``METHOD\\nPATH?QUERY\\nTIMESTAMP\\nNONCE\\nhex(SHA-256(body))``. The verifier checks the
signature against the node's public key, rejects timestamps outside a window (default ±60 s) and is
responsible for remembering nonces for the window (replay protection needs state, so it is not here).
The same envelope authenticates the WebSocket handshake (method GET, empty body).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from meshd.proto.encoding import b64decode, b64encode

HEADER_NODE = "x-mesh-node"
HEADER_TIMESTAMP = "x-mesh-timestamp"
HEADER_NONCE = "x-mesh-nonce"
HEADER_SIGNATURE = "x-mesh-signature"
WINDOW_SECONDS = 60
KEY_BYTES = 32
SIGNATURE_BYTES = 64

_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_NODE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class SignatureError(ValueError):
    """A signed request or proof is malformed, stale or does not verify."""


@dataclass(frozen=True, slots=True)
class SignedHeaders:
    """The parsed signature envelope of one request."""

    node: str  #: node id (or, for a pending enrollment, its code)
    timestamp: int  #: unix seconds when the node signed
    nonce: str  #: 128 random bits, hex
    signature: bytes  #: Ed25519 signature (64 bytes)


def canonical_request(method: str, target: str, timestamp: int, nonce: str, body: bytes) -> bytes:
    """The byte string a node signs for one request (`target` is the path plus ``?query`` if any)."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{method.upper()}\n{target}\n{timestamp}\n{nonce}\n{digest}".encode()


def sign_request(
    node_key: bytes,
    node: str,
    method: str,
    target: str,
    body: bytes,
    now: float,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers that authenticate one request by the node whose Ed25519 seed is `node_key`."""
    if nonce is None:
        nonce = os.urandom(16).hex()
    timestamp = int(now)
    message = canonical_request(method, target, timestamp, nonce, body)
    signature = SigningKey(node_key).sign(message).signature
    return {
        HEADER_NODE: node,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: b64encode(signature),
    }


def parse_headers(headers: Mapping[str, str]) -> SignedHeaders:
    """Extract the envelope from request headers (case-insensitive mapping expected)."""
    values: dict[str, str] = {}
    for name in (HEADER_NODE, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE):
        value = headers.get(name)
        if value is None:
            raise SignatureError(f"missing header {name}")
        values[name] = value
    node = values[HEADER_NODE]
    if not _NODE_RE.fullmatch(node):
        raise SignatureError(f"malformed header {HEADER_NODE}")
    ts_text = values[HEADER_TIMESTAMP]
    if not ts_text.isascii() or not ts_text.isdigit() or len(ts_text) > 12:
        raise SignatureError(f"malformed header {HEADER_TIMESTAMP}: expected unix seconds")
    nonce = values[HEADER_NONCE]
    if not _NONCE_RE.fullmatch(nonce):
        raise SignatureError(f"malformed header {HEADER_NONCE}: expected 32 lowercase hex digits")
    try:
        signature = b64decode(values[HEADER_SIGNATURE], length=SIGNATURE_BYTES, what=HEADER_SIGNATURE)
    except ValueError as exc:
        raise SignatureError(str(exc)) from None
    return SignedHeaders(node=node, timestamp=int(ts_text), nonce=nonce, signature=signature)


def verify_request(
    envelope: SignedHeaders,
    public_key: bytes,
    method: str,
    target: str,
    body: bytes,
    now: float,
    window: int = WINDOW_SECONDS,
) -> None:
    """Raise SignatureError unless the envelope is fresh and signed by `public_key` over this request."""
    if abs(now - envelope.timestamp) > window:
        raise SignatureError(f"stale timestamp: more than {window} s from the server clock")
    message = canonical_request(method, target, envelope.timestamp, envelope.nonce, body)
    _verify(public_key, message, envelope.signature, "request signature")


def enrollment_message(
    challenge: bytes, wg_public_key: bytes, node_public_key: bytes, hostname: str
) -> bytes:
    """Canonical encoding of what a node signs at enrollment: length-prefixed fields under a context label."""
    parts = [b"meshvpn-enroll-v1", challenge, wg_public_key, node_public_key, hostname.encode("utf-8")]
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def sign_enrollment(
    node_key: bytes, challenge: bytes, wg_public_key: bytes, node_public_key: bytes, hostname: str
) -> bytes:
    """Ed25519 signature proving possession of the node key at enrollment."""
    message = enrollment_message(challenge, wg_public_key, node_public_key, hostname)
    return SigningKey(node_key).sign(message).signature


def verify_enrollment(
    signature: bytes, challenge: bytes, wg_public_key: bytes, node_public_key: bytes, hostname: str
) -> None:
    """Raise SignatureError unless `signature` is the node key's signature over the enrollment fields."""
    message = enrollment_message(challenge, wg_public_key, node_public_key, hostname)
    _verify(node_public_key, message, signature, "enrollment signature")


def public_key_of(node_key: bytes) -> bytes:
    """The Ed25519 public key for a 32-byte seed."""
    return bytes(SigningKey(node_key).verify_key)


def _verify(public_key: bytes, message: bytes, signature: bytes, what: str) -> None:
    if len(public_key) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"bad {what}: wrong key or signature length")
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        raise SignatureError(f"bad {what}") from None
