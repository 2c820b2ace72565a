"""Which coordinator signing keys a node trusts, and how a rotated key earns that trust (pure functions).

When the coordinator rotates its signing key (``coordinator rotate-signing-key``) the old key signs
(Ed25519, RFC 8032 §5.1) the new public key::

    signature = Ed25519(old_seed, b"meshvpn signing key endorsement v1\\n" + new_public_key)

Nodes fetch the announced keys (``GET /api/v1/signing-keys``, a signed request) and :func:`accept`
keeps a key only if it is already trusted or endorsed by a key that is (chains allowed). A key the
coordinator no longer announces (its overlap ended) is dropped; trust is never emptied.

JSON: ``{"keys": [{"key": b64, "endorsed_by": b64 | null, "signature": b64 | null}, ...]}`` (active first).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from meshd.proto.encoding import b64decode, b64encode

CONTEXT = b"meshvpn signing key endorsement v1\n"


class TrustError(ValueError):
    """A malformed key announcement."""


@dataclass(frozen=True, slots=True)
class AnnouncedKey:
    key: bytes  #: Ed25519 public key (32 bytes)
    endorsed_by: bytes | None = None  #: the key that signed it (None: the node must already trust it)
    signature: bytes | None = None


def endorse(old_seed: bytes, new_public: bytes) -> bytes:
    """The old key's signature over the new public key."""
    return SigningKey(old_seed).sign(CONTEXT + new_public).signature


def endorsed(a: AnnouncedKey) -> bool:
    if a.endorsed_by is None or a.signature is None:
        return False
    try:
        VerifyKey(a.endorsed_by).verify(CONTEXT + a.key, a.signature)
    except (BadSignatureError, ValueError):
        return False
    return True


def accept(trusted: Sequence[bytes], announced: Iterable[AnnouncedKey]) -> tuple[bytes, ...]:
    """The announced keys the node may trust, in announced order; ``trusted`` unchanged if none."""
    items = list(announced)
    ok = set(trusted)  # a key we trust may endorse its successor even when no longer announced itself
    grew = True
    while grew:
        grew = False
        for a in items:
            if a.key not in ok and a.endorsed_by in ok and endorsed(a):
                ok.add(a.key)
                grew = True
    out = tuple(dict.fromkeys(a.key for a in items if a.key in ok))
    return out or tuple(trusted)


def encode(keys: Iterable[AnnouncedKey]) -> dict[str, Any]:
    return {
        "keys": [
            {
                "key": b64encode(a.key),
                "endorsed_by": b64encode(a.endorsed_by) if a.endorsed_by else None,
                "signature": b64encode(a.signature) if a.signature else None,
            }
            for a in keys
        ]
    }


def decode(doc: Any) -> tuple[AnnouncedKey, ...]:
    try:
        out = []
        for item in doc["keys"]:
            by, sig = item.get("endorsed_by"), item.get("signature")
            out.append(
                AnnouncedKey(
                    b64decode(item["key"], length=32, what="key"),
                    b64decode(by, length=32, what="endorsed_by") if by else None,
                    b64decode(sig, length=64, what="signature") if sig else None,
                )
            )
        return tuple(out)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise TrustError(f"malformed signing key announcement: {exc}") from None
