"""Enrollment with proof of possession of both node keys.

1. ``POST /api/v1/register/challenge`` -> a random 32-byte challenge (single use, short expiry) and a
   fresh server X25519 public key.
2. ``POST /api/v1/register`` carries the public keys, the challenge, an Ed25519 signature by the node key
   over :func:`meshd.proto.signing.enrollment_message`, and a NaCl box (XSalsa20-Poly1305 with the
   X25519 shared secret of the node's WireGuard private key and the server's ephemeral key) of the
   challenge: only the holder of the WireGuard private key can make it.
3. With a pre-auth key the node is enrolled at once; without, it gets a code for
   ``coordinator nodes approve CODE`` and polls a status endpoint signed with its node key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import weakref
from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from sqlalchemy import delete, func, select

from coordinator import challenges, groupcommit
from coordinator.core import Core, Tx
from coordinator.db.models import Challenge, Node, PendingEnrollment
from coordinator.errors import BadRequest, Conflict, CoordinatorError, Gone, NotFound, Unauthorized
from coordinator.identity import redeem_key
from coordinator.nodes import Enrolled, create_node, prefetch_clashes
from coordinator.ratelimit import TokenBuckets
from meshd.proto import signing
from meshd.proto.encoding import b64decode, b64encode

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I, O, 0, 1

#: Anonymous registrations (no pre-auth key: each parks a pending row and writes an audit row) per source
#: address: a token bucket of ANON_BURST refilled at ANON_RATE per second (10 per minute). A real node
#: registers once and then polls; a flood from one address costs at most this many rows per minute.
ANON_BURST = 10.0
ANON_RATE = 10.0 / 60.0
#: pending (not yet approved) enrollments in total: past this, anonymous registrations are refused until
#: an admin approves or the codes expire (expired rows are purged on every anonymous registration)
MAX_PENDING = 1000
#: the hostname as written to the audit trail: DNS-label-safe and at most 63 characters, so that an
#: unauthenticated client chooses at most this much of what lands in the permanent, signed audit log
AUDIT_HOSTNAME_MAX = 63
_UNSAFE = re.compile(r"[^a-z0-9-]")
#: per-source-address buckets for registrations without a key, per core (tests build several)
_anon_buckets: weakref.WeakKeyDictionary[Core, TokenBuckets[str]] = weakref.WeakKeyDictionary()


class RateLimited(CoordinatorError):
    status = 429


def _anon_allowed(core: Core, source: str) -> bool:
    buckets = _anon_buckets.setdefault(core, TokenBuckets(ANON_RATE, ANON_BURST))
    return buckets.allow(source, time.monotonic())


def audit_hostname(hostname: str) -> str:
    """What of an unauthenticated client's hostname goes into the audit row: a DNS-safe 63-char label."""
    safe = _UNSAFE.sub("-", hostname.lower())[:AUDIT_HOSTNAME_MAX]
    return safe or "-"


@dataclass(frozen=True, slots=True)
class IssuedChallenge:
    challenge: str
    server_ephemeral_x25519_pub: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Registration:
    hostname: str
    wg_public_key: str
    node_public_key: str
    auth_key: str | None
    challenge: str
    signature: str
    box: str


@dataclass(frozen=True, slots=True)
class Pending:
    code: str
    expires_at: float


def _challenge_id(challenge: bytes) -> str:
    return hashlib.sha256(challenge).hexdigest()


def normalize_code(code: str) -> str:
    raw = code.strip().upper().replace("-", "")
    if len(raw) != 8 or any(c not in CODE_ALPHABET for c in raw):
        raise BadRequest(f"bad code {code!r}: expected 8 characters like ABCD-EFGH")
    return f"{raw[:4]}-{raw[4:]}"


async def issue_challenge(core: Core) -> IssuedChallenge:
    """A stateless challenge (coordinator/challenges.py): no database work until it is used."""
    key = challenges.keys_of(core).current(core.keys.active_seed)
    challenge, ephemeral, expires = challenges.issue(key, core.settings.challenge_lifetime)
    return IssuedChallenge(b64encode(challenge), b64encode(bytes(ephemeral.public_key)), expires)


def open_challenge(core: Core, challenge: bytes, now: float) -> challenges.Opened | None:
    """Check a stateless challenge before any database work; None when it is not one (it may be a legacy
    row, see :func:`take_challenge`). Raises Unauthorized when it expired."""
    keys = challenges.keys_of(core).accepted(core.keys.active_seed, now)
    try:
        return challenges.open_challenge(keys, challenge, now)
    except challenges.Expired:
        raise Unauthorized("challenge expired: request a new one") from None
    except challenges.ChallengeError:
        return None


async def take_challenge(
    tx: Tx, opened: challenges.Opened | None, challenge: bytes, now: float
) -> PrivateKey | Unauthorized:
    """Use `challenge` up inside `tx` (`opened`: :func:`open_challenge`'s answer): the server's ephemeral
    key for it, or Unauthorized to return (an expired legacy challenge is consumed, and that must be
    committed before the caller complains). Raises Unauthorized for one unknown or already used.

    Single use: a stateless challenge's used marker is inserted here. A challenge from before the
    stateless ones (a row with its ephemeral key, written by an older coordinator in the minute before an
    upgrade) is still accepted once."""
    if opened is not None:
        fresh: set[str] | None = tx.session.info.get(_FRESH)  # marked for the whole group by _prepare
        if fresh is not None and opened.id in fresh:
            fresh.discard(opened.id)  # the first unit with this challenge has it; a second is a replay
        elif fresh is not None or not await challenges.mark_used(tx.session, opened):
            raise Unauthorized("unknown or already used challenge: request a new one")
        return opened.ephemeral
    row = await tx.session.get(Challenge, _challenge_id(challenge))
    if row is None or not row.ephemeral_private:  # "": a stateless challenge's used marker
        raise Unauthorized("unknown or already used challenge: request a new one")
    await tx.session.delete(row)
    if row.expires_at <= now:
        return Unauthorized("challenge expired: request a new one")
    return PrivateKey(b64decode(row.ephemeral_private))


_FRESH = "enrollment.fresh_challenges"  #: session.info: challenge ids _prepare marked used, not yet taken


@dataclass(frozen=True, slots=True)
class _Ahead:
    """What a registration with a pre-auth key will look up, for the group's batched look-ups."""

    opened: challenges.Opened
    hostname: str
    wg_public_key: str
    node_public_key: str


async def _prepare(tx: Tx, items: list[_Ahead]) -> None:
    """The group's look-ups in two statements instead of two per enrollment: every challenge's used
    marker (one INSERT ... RETURNING) and every key clash and taken name (one SELECT)."""
    tx.session.info[_FRESH] = await challenges.mark_many_used(tx.session, [i.opened for i in items])
    await prefetch_clashes(tx, [(i.hostname, i.wg_public_key, i.node_public_key) for i in items])


def proves_key(ephemeral: PrivateKey, wg: bytes, challenge: bytes, box: bytes) -> bool:
    """Does `box` open, with the server's ephemeral key and the node's WireGuard key, to the challenge?"""
    try:
        return bool(Box(ephemeral, PublicKey(wg)).decrypt(box) == challenge)
    except (CryptoError, ValueError, TypeError):
        return False


def _keys(reg: Registration) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    try:
        wg = b64decode(reg.wg_public_key, length=32, what="wg_public_key")
        node = b64decode(reg.node_public_key, length=32, what="node_public_key")
        challenge = b64decode(reg.challenge, length=32, what="challenge")
        sig = b64decode(reg.signature, length=64, what="signature")
        box = b64decode(reg.box, what="box")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if not 1 <= len(reg.hostname) <= 255:
        raise BadRequest("hostname must be 1 to 255 characters")
    return wg, node, challenge, sig, box


async def register(core: Core, reg: Registration, source: str | None = None) -> Enrolled | Pending:
    """Verify the proofs and enroll (with a key) or park the node for approval (without).

    `source` (the client's address) rate-limits registrations without a key, before any database work.
    """
    wg, node_pub, challenge, sig, box = _keys(reg)
    if reg.auth_key is None and source is not None and not _anon_allowed(core, source):
        raise RateLimited(
            f"too many registrations without a key from this address (at most {int(ANON_BURST)} per minute)"
        )
    now = time.time()
    try:
        signing.verify_enrollment(sig, challenge, wg, node_pub, reg.hostname)
    except signing.SignatureError as exc:
        raise Unauthorized(f"{exc}: the node key did not sign this enrollment") from None

    # a stateless challenge and its box are checked before the group: a bad one costs the others nothing
    opened = open_challenge(core, challenge, now)
    if opened is not None and not proves_key(opened.ephemeral, wg, challenge, box):
        raise Unauthorized("bad proof of the WireGuard key: the box does not open to the challenge")

    async def unit(tx: Tx) -> Enrolled | Pending | Unauthorized:
        return await _register(tx, reg, wg, opened, challenge, box, now)

    ahead = None
    if opened is not None and reg.auth_key is not None:
        ahead = (_prepare, _Ahead(opened, reg.hostname, reg.wg_public_key, reg.node_public_key))
    # one commit (fsync) for the enrollments arriving together
    result = await groupcommit.of(core).run(unit, ahead)
    if isinstance(result, Unauthorized):
        raise result  # the consumed expired challenge is committed before we complain
    return result


async def _register(
    tx: Tx,
    reg: Registration,
    wg: bytes,
    opened: challenges.Opened | None,
    challenge: bytes,
    box: bytes,
    now: float,
) -> Enrolled | Pending | Unauthorized:
    """The transactional part of :func:`register` (a group-commit unit: every effect goes through `tx`)."""
    core = tx.core
    ephemeral = await take_challenge(tx, opened, challenge, now)
    if isinstance(ephemeral, Unauthorized):
        return ephemeral
    if opened is None and not proves_key(ephemeral, wg, challenge, box):
        raise Unauthorized("bad proof of the WireGuard key: the box does not open to the challenge")
    if reg.auth_key is not None:
        key = await redeem_key(tx, reg.auth_key, now)
        return await create_node(
            tx,
            hostname=reg.hostname,
            wg_public_key=reg.wg_public_key,
            node_public_key=reg.node_public_key,
            user_id=key.user_id,
            tags=key.tags,
            actor=f"user:{key.user}",
            how=f"pre-auth key {key.prefix}",
            ephemeral=key.ephemeral,
        )
    clash = (
        await tx.session.execute(select(Node.id).where(Node.node_public_key == reg.node_public_key))
    ).first()
    if clash is not None:
        raise Conflict("this node key is already enrolled")
    # purge: unapproved codes once expired; approved ones a lifetime later (their node polled by then)
    await tx.session.execute(
        delete(PendingEnrollment).where(
            PendingEnrollment.expires_at <= now,
            (PendingEnrollment.node_id.is_(None))
            | (PendingEnrollment.expires_at <= now - core.settings.enroll_code_lifetime),
        )
    )
    waiting = (
        await tx.session.execute(
            select(func.count()).select_from(PendingEnrollment).where(PendingEnrollment.node_id.is_(None))
        )
    ).scalar_one()
    if waiting >= MAX_PENDING:
        raise RateLimited(f"too many enrollments wait for approval ({MAX_PENDING}): try again later")
    existing = (
        await tx.session.execute(
            select(PendingEnrollment).where(PendingEnrollment.node_public_key == reg.node_public_key)
        )
    ).scalar_one_or_none()
    if existing is not None:
        await tx.session.delete(existing)
        await tx.session.flush()
    code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(8))
    code = f"{code[:4]}-{code[4:]}"
    pending = PendingEnrollment(
        code=code,
        hostname=reg.hostname,
        wg_public_key=reg.wg_public_key,
        node_public_key=reg.node_public_key,
        created_at=now,
        expires_at=now + core.settings.enroll_code_lifetime,
        node_id=None,
    )
    tx.session.add(pending)
    await tx.audit(
        "node",
        "enrollment.requested",
        f"code:{code}",
        {"hostname": audit_hostname(reg.hostname), "node_public_key": reg.node_public_key},
    )
    return Pending(code, pending.expires_at)


async def pending_public_key(core: Core, code: str) -> bytes:
    async with core.read() as s:
        row = await s.get(PendingEnrollment, normalize_code(code))
    if row is None:
        raise NotFound("unknown enrollment code")
    return b64decode(row.node_public_key)


async def status(core: Core, code: str) -> Enrolled | Pending:
    """The enrollment behind `code` once approved; Gone when it expired."""
    code = normalize_code(code)
    async with core.read() as s:
        row = await s.get(PendingEnrollment, code)
        if row is None:
            raise NotFound("unknown enrollment code")
        if row.node_id is not None:
            node = await s.get(Node, row.node_id)
            if node is None or node.expired:
                raise Gone("the node enrolled with this code was removed or expired")
            return Enrolled(node.id, node.name, (f"{node.ipv4}/32", f"{node.ipv6}/128"), node.cert)
        if row.expires_at <= time.time():
            raise Gone("enrollment code expired: run the enrollment again")
        return Pending(row.code, row.expires_at)


async def approve(core: Core, code: str, actor: str) -> Enrolled:
    code = normalize_code(code)
    async with core.transaction() as tx:
        row = await tx.session.get(PendingEnrollment, code)
        if row is None:
            raise NotFound(f"unknown enrollment code {code}")
        if row.node_id is not None:
            raise Conflict(f"code {code} was already approved")
        if row.expires_at <= time.time():
            raise Gone(f"enrollment code {code} expired")
        enrolled = await create_node(
            tx,
            hostname=row.hostname,
            wg_public_key=row.wg_public_key,
            node_public_key=row.node_public_key,
            user_id=None,
            tags=(),
            actor=actor,
            how=f"approved code {code}",
        )
        row.node_id = enrolled.node_id
        await tx.audit(actor, "node.approved", f"node:{enrolled.name}", {"code": code})
        return enrolled
