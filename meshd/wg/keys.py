"""WireGuard keys at the edges: base64 (public API, like `wg`), hex (UAPI), raw 32 bytes (netlink).

Curve25519 keys per the WireGuard paper §5.4 / RFC 7748 §6.1 (X25519). Private keys never appear in logs
or reprs: the dataclasses that hold them mark those fields ``repr=False``.
"""

from __future__ import annotations

import base64
import binascii

from nacl.bindings import crypto_scalarmult_base
from nacl.utils import random as random_bytes

from meshd.wg.errors import WgConfigError

KEY_LEN = 32
ZERO_KEY_B64 = base64.b64encode(bytes(KEY_LEN)).decode()


def key_bytes(key_b64: str, what: str = "key") -> bytes:
    """Decode a base64 WireGuard key; raise WgConfigError naming `what` when it is not 32 bytes."""
    try:
        raw = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        raise WgConfigError(f"{what} is not valid base64") from None
    if len(raw) != KEY_LEN:
        raise WgConfigError(f"{what} must decode to {KEY_LEN} bytes, got {len(raw)}")
    return raw


def canonical_key(key_b64: str, what: str = "key") -> str:
    """The canonical base64 spelling of a key (validates it)."""
    return base64.b64encode(key_bytes(key_b64, what)).decode()


def b64_from_bytes(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def b64_to_hex(key_b64: str, what: str = "key") -> str:
    return key_bytes(key_b64, what).hex()


def hex_to_b64(key_hex: str) -> str:
    """Hex key (as UAPI writes it) to base64; ValueError when it is not 64 hex digits."""
    if len(key_hex) != 2 * KEY_LEN:
        raise ValueError(f"key must be {2 * KEY_LEN} hex digits, got {len(key_hex)}")
    return base64.b64encode(bytes.fromhex(key_hex)).decode()


def generate_private_key() -> str:
    """A new clamped Curve25519 private key, base64 (like `wg genkey`)."""
    raw = bytearray(random_bytes(KEY_LEN))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return b64_from_bytes(bytes(raw))


def public_key(private_key_b64: str) -> str:
    """The public key of a private key, base64 (like `wg pubkey`)."""
    return b64_from_bytes(crypto_scalarmult_base(key_bytes(private_key_b64, "private key")))
