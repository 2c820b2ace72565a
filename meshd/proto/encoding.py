"""Small helpers shared by the wire formats: strict base64 and canonical JSON."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any


def b64encode(data: bytes) -> str:
    """Standard base64 with padding (the WireGuard convention for keys)."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, length: int | None = None, what: str = "value") -> bytes:
    """Decode strict base64; raise ValueError naming `what` when it is malformed or has the wrong length."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if length is not None and len(data) != length:
        raise ValueError(f"{what} must be {length} bytes, got {len(data)}")
    return data


def canonical_json(value: Any) -> bytes:
    """Canonical JSON: sorted keys, compact separators, UTF-8 (RFC 8785 subset for our value types)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
