"""The "call me maybe" signal: our candidates and the wall-clock moment at which we both probe.

It travels as the payload of a :class:`meshd.proto.netmap.SignalMessage`, relayed by the coordinator
from one node to another without being read. On the wire it is a JSON object::

    {"type": "cmm", "candidates": ["203.0.113.7:41641", "[2001:db8::1]:41641"], "at": 1767225600.25}

``at`` is a Unix time (float seconds). Anything else in the object is ignored, so later versions can
add fields. The payload comes from another node, so decoding trusts nothing: every malformed payload
raises :class:`CallMeMaybeError` and nothing else.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshd.proto.endpoint import Endpoint, format_endpoint
from meshd.proto.netmap import MAX_CANDIDATES

TYPE = "cmm"
MAX_CANDIDATE_LEN = 64  #: the longest "[v6]:port" is 47 characters; the coordinator allows 64 too


class CallMeMaybeError(ValueError):
    """The payload is not a well-formed call-me-maybe."""


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    """A peer's request to probe it at the moment ``at`` (Unix time), at any of ``candidates``."""

    candidates: tuple[Endpoint, ...]
    at: float

    def encode(self) -> dict[str, Any]:
        return {"type": TYPE, "candidates": [format_endpoint(c) for c in self.candidates], "at": self.at}

    @classmethod
    def decode(cls, payload: object) -> CallMeMaybe:
        """Parse a signal payload; raises :class:`CallMeMaybeError` for anything malformed."""
        if not isinstance(payload, Mapping):
            raise CallMeMaybeError("payload is not an object")
        if payload.get("type") != TYPE:
            raise CallMeMaybeError(f"not a call-me-maybe (type {payload.get('type')!r})")
        cands = payload.get("candidates")
        if not isinstance(cands, list):
            raise CallMeMaybeError("candidates: not a list")
        if len(cands) > MAX_CANDIDATES:
            raise CallMeMaybeError(f"candidates: more than {MAX_CANDIDATES}")
        at = payload.get("at")
        # bool is an int subclass in Python, but `true` is no moment
        if isinstance(at, bool) or not isinstance(at, int | float):
            raise CallMeMaybeError("at: not a number")
        try:
            moment = float(at)
        except OverflowError:  # an int too large for a float
            raise CallMeMaybeError("at: out of range") from None
        if not math.isfinite(moment):
            raise CallMeMaybeError("at: not finite")
        return cls(tuple(parse_endpoint(c) for c in cands), moment)


def parse_endpoint(text: object) -> Endpoint:
    """``"ip:port"`` or ``"[v6]:port"`` to an :data:`Endpoint`; the address literal is normalised."""
    # no zone id ("%..."): it may hold a newline and means nothing on another host
    if not isinstance(text, str) or len(text) > MAX_CANDIDATE_LEN or "%" in text or not text.isprintable():
        raise CallMeMaybeError(f"candidate {text!r}: not an address string")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise CallMeMaybeError(f"candidate {text!r}: no port")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise CallMeMaybeError(f"candidate {text!r}: not an IP address") from None
    if (ip.version == 6) != bracketed:
        raise CallMeMaybeError(f"candidate {text!r}: IPv6 addresses go in brackets, IPv4 not")
    if not 0 < int(port) < 65536:
        raise CallMeMaybeError(f"candidate {text!r}: port out of range")
    return (str(ip), int(port))
