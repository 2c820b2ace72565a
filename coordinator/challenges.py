"""Stateless enrollment challenges (issue 16): nothing is stored when a challenge is issued.

A challenge used to be a database row (the 32 random bytes' hash, the server's ephemeral X25519 private
key, the expiry) written by its own transaction. Now the challenge carries what the server needs back:

    challenge = nonce (12 random bytes) || expires_at (4 bytes, unix seconds, big-endian)
                || tag (16 bytes: HMAC-SHA256(key, "meshvpn challenge v1" || nonce || expires_at))
    ephemeral X25519 private key = HMAC-SHA256(key, "meshvpn challenge x25519 v1" || challenge)

It stays 32 bytes because meshd (every version) decodes the challenge as exactly 32 bytes and signs it:
there is no room for a sealed box (24-byte nonce + 16-byte MAC) of a 32-byte private key, so the key is
derived from the authenticated challenge instead of carried in it. Forging a challenge (a later expiry, or
one this coordinator never issued) needs the key; the ephemeral private key is known only to whoever holds
the key. The key is derived from the coordinator's signing key seed, which every replica shares, so any
replica opens any replica's challenge; after a signing-key rotation the previous key is still accepted
for one challenge lifetime.

Single use is the register (or key rotation) transaction's job: it inserts the challenge's SHA-256 into
the ``challenges`` table (a used marker, purged after its expiry by the janitor) and refuses a challenge
whose marker is there already.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nacl.public import PrivateKey
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator.db.models import Challenge

if TYPE_CHECKING:
    from coordinator.core import Core

CHALLENGE_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
_EXPIRES = struct.Struct(">I")
_KEY_LABEL = b"meshvpn enrollment challenge key v1"
_TAG_LABEL = b"meshvpn challenge v1"
_X25519_LABEL = b"meshvpn challenge x25519 v1"


class ChallengeError(Exception):
    """The challenge is not one this coordinator issued (malformed, forged, other key) or it expired."""


class Expired(ChallengeError):
    pass


@dataclass(frozen=True, slots=True)
class Opened:
    """A challenge this coordinator issued and that has not expired."""

    challenge: bytes
    expires_at: float
    ephemeral: PrivateKey  #: the server's ephemeral X25519 key for this challenge

    @property
    def id(self) -> str:
        """The used-marker's key (the ``challenges`` table): SHA-256 of the challenge, hex."""
        return hashlib.sha256(self.challenge).hexdigest()


def derive_key(signing_seed: bytes) -> bytes:
    """The challenge MAC key of a signing key seed (domain-separated: the seed signs nothing with it)."""
    return hmac.new(signing_seed, _KEY_LABEL, hashlib.sha256).digest()


def _tag(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, _TAG_LABEL + body, hashlib.sha256).digest()[:TAG_LEN]


def _ephemeral(key: bytes, challenge: bytes) -> PrivateKey:
    return PrivateKey(hmac.new(key, _X25519_LABEL + challenge, hashlib.sha256).digest())


def issue(key: bytes, lifetime: float, now: float | None = None) -> tuple[bytes, PrivateKey, float]:
    """A new challenge, its server ephemeral key, and its expiry (whole seconds, rounded up)."""
    now = time.time() if now is None else now
    expires = min(math.ceil(now + lifetime), 2**32 - 1)
    body = os.urandom(NONCE_LEN) + _EXPIRES.pack(expires)
    challenge = body + _tag(key, body)
    return challenge, _ephemeral(key, challenge), float(expires)


def parse(challenge: bytes) -> tuple[bytes, float, bytes]:
    """(signed body, expiry, tag) of a challenge's bytes; ChallengeError when it cannot be one."""
    if len(challenge) != CHALLENGE_LEN:
        raise ChallengeError(f"a challenge is {CHALLENGE_LEN} bytes, got {len(challenge)}")
    body, tag = challenge[: NONCE_LEN + _EXPIRES.size], challenge[NONCE_LEN + _EXPIRES.size :]
    (expires,) = _EXPIRES.unpack_from(body, NONCE_LEN)
    return body, float(expires), tag


def open_challenge(keys: tuple[bytes, ...], challenge: bytes, now: float | None = None) -> Opened:
    """Check `challenge` against `keys` (the current key first) and its expiry.

    ChallengeError when no key made it (malformed, forged, another coordinator's); Expired when one did
    but it is past its expiry."""
    body, expires, tag = parse(challenge)
    for key in keys:
        if hmac.compare_digest(_tag(key, body), tag):
            if expires <= (time.time() if now is None else now):
                raise Expired("challenge expired: request a new one")
            return Opened(challenge, expires, _ephemeral(key, challenge))
    raise ChallengeError("unknown challenge: request a new one")


class Keys:
    """A coordinator's challenge keys: derived from its active signing seed; the previous seed's key is
    kept for one challenge lifetime after a rotation so challenges issued just before it still open."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._seed: bytes | None = None
        self._key = b""
        self._previous: tuple[bytes, float] | None = None  #: (key, accepted until)

    def current(self, seed: bytes, now: float | None = None) -> bytes:
        if seed != self._seed:
            now = time.time() if now is None else now
            if self._seed is not None:
                self._previous = (self._key, now + self.lifetime + 1)
            self._seed, self._key = seed, derive_key(seed)
        return self._key

    def accepted(self, seed: bytes, now: float | None = None) -> tuple[bytes, ...]:
        now = time.time() if now is None else now
        key = self.current(seed, now)
        if self._previous is not None and self._previous[1] > now:
            return (key, self._previous[0])
        return (key,)


_keys: weakref.WeakKeyDictionary[Core, Keys] = weakref.WeakKeyDictionary()


def keys_of(core: Core) -> Keys:
    """The challenge keys of a coordinator core (one per core: tests build several)."""
    found = _keys.get(core)
    if found is None:
        found = _keys[core] = Keys(core.settings.challenge_lifetime)
    return found


def _insert(session: AsyncSession) -> sqlite.Insert | postgresql.Insert:
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(Challenge)
    return sqlite.insert(Challenge)


async def mark_used(session: AsyncSession, opened: Opened) -> bool:
    """Insert the challenge's used marker in the caller's transaction; False when it was used already
    (by this replica or another: the marker is a primary key). One statement, no autoflush: the group's
    pending rows (coordinator/groupcommit.py) go to the database together at its commit."""
    stmt = (
        _insert(session)
        .values(challenge=opened.id, ephemeral_private="", expires_at=opened.expires_at)
        .on_conflict_do_nothing(index_elements=["challenge"])
    )
    with session.no_autoflush:
        result = await session.execute(stmt)
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def mark_many_used(session: AsyncSession, many: list[Opened]) -> set[str]:
    """:func:`mark_used` for many challenges in one statement: the ids of those that were not used
    before (a challenge given twice counts once: the caller hands it to the first that asks)."""
    rows = {o.id: {"challenge": o.id, "ephemeral_private": "", "expires_at": o.expires_at} for o in many}
    if not rows:
        return set()
    stmt = (
        _insert(session)
        .values(list(rows.values()))
        .on_conflict_do_nothing(index_elements=["challenge"])
        .returning(Challenge.challenge)
    )
    with session.no_autoflush:
        return set((await session.execute(stmt)).scalars().all())
