"""Append-only, hash-chained audit trail, anchored by checkpoints signed with the coordinator's key.

Each record's hash is SHA-256 over the canonical JSON of (id, time, actor, action, object, details,
prev_hash); the newest hash and id are kept in `meta` so deleting the last records is detected too.
Appends happen inside the caller's transaction under the coordinator's write lock (and, on PostgreSQL,
a transaction-scoped advisory lock) so the chain never forks.

The chain alone is unkeyed: whoever can write the database can edit a record and recompute every hash
after it. Checkpoints close that: every `CHECKPOINT_EVERY`-th record, the first record, a signing-key
rotation, and each start and stop of the coordinator store (seq, head hash, time, key id) signed with
the coordinator's Ed25519 signing key, which lives in the state dir, not in the database. `verify`
checks every checkpoint whose key the coordinator still trusts against the chain, requires the
periodic ones to exist, and requires the newest to be signed by a trusted key. The newest checkpoint this
coordinator signed is also written to `<state-dir>/audit_anchor` (seq and head), so deleting the
checkpoints from the database, or rolling the database back behind it, is detected too. What stays
possible with the database alone: editing the records after the newest checkpoint (until the next one).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator.certs import write_private
from coordinator.db.models import AuditCheckpoint, AuditRecord, Meta
from meshd.proto import cert as certfmt
from meshd.proto.encoding import b64decode, b64encode, canonical_json

GENESIS = "0" * 64
_HEAD = "audit_head"
#: after retention dropped records 1..C (coordinator/auditretention.py): "C:<hash of record C>", the chain's
#: new start; record C's signed checkpoint is kept and an ``audit.pruned`` record in the chain names it
BASE = "audit_base"
PRUNED = "audit.pruned"
_ADVISORY_LOCK = 0x6D657368  # "mesh"
_LOCKED = "audit.locked"  #: session.info: this transaction holds the audit chain's advisory lock

_SECRET_WORDS = ("key", "secret", "token", "password", "private")

CHECKPOINT_EVERY = 100  #: a signed checkpoint at every record id divisible by this (and at record 1)
#: after a rotation the old key is dropped once its overlap ends, so the newest checkpoint must be made
#: with the new key at once: `verify` insists the newest checkpoint verifies with a trusted key
_ANCHOR_ACTIONS = frozenset({"signing_key.rotated"})
_CHECKPOINT_CONTEXT = b"meshvpn audit checkpoint v1\n"  #: domain separation from certificates etc.
#: `Session.info` key of a callable returning the trusted signing public keys (set by coordinator.core)
SESSION_KEYS = "audit_trusted_keys"
#: `Session.info` key of a callable returning the state dir's anchor, `(seq, head)` or None
SESSION_ANCHOR = "audit_anchor"
ANCHOR_FILE = "audit_anchor"
_ANCHOR_RE = re.compile(r"^(\d+) ([0-9a-f]{64})\n?$")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    time: str
    actor: str
    action: str
    object: str
    details: dict[str, Any]
    prev_hash: str
    hash: str
    checkpointed: bool = False  #: a signed checkpoint of this record was added with it


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    records: int
    problem: str | None = None


def record_hash(id_: int, time: str, actor: str, action: str, obj: str, details: str, prev_hash: str) -> str:
    body = canonical_json(
        {
            "id": id_,
            "time": time,
            "actor": actor,
            "action": action,
            "object": obj,
            "details": details,
            "prev_hash": prev_hash,
        }
    )
    return hashlib.sha256(body).hexdigest()


def _check_no_secrets(details: dict[str, Any]) -> None:
    for k in details:
        if any(w in k.lower() for w in _SECRET_WORDS) and not k.endswith(("public_key", "_prefix", "_id")):
            raise ValueError(f"audit details must not carry secrets (field {k!r})")


def _checkpoint_body(seq: int, head: str, when: str, key_id: str) -> bytes:
    return _CHECKPOINT_CONTEXT + canonical_json({"seq": seq, "head": head, "time": when, "key_id": key_id})


def _sign_checkpoint(seq: int, head: str, seed: bytes) -> AuditCheckpoint:
    key = SigningKey(seed)
    key_id = certfmt.key_id(bytes(key.verify_key))
    when = datetime.now(UTC).isoformat(timespec="microseconds")
    signature = key.sign(_checkpoint_body(seq, head, when, key_id)).signature
    return AuditCheckpoint(seq=seq, head_hash=head, time=when, key_id=key_id, signature=b64encode(signature))


async def append(
    session: AsyncSession,
    actor: str,
    action: str,
    obj: str,
    details: dict[str, Any] | None = None,
    *,
    signer: bytes | None = None,
) -> AuditEntry:
    """Add one record to the chain in the current transaction; with `signer` (the active signing key's
    seed) also the signed checkpoint when this record is due one."""
    details = details or {}
    _check_no_secrets(details)
    # the lock is the transaction's: once is enough (a group-commit transaction appends many records)
    if session.get_bind().dialect.name == "postgresql" and not session.info.get(_LOCKED):
        await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK})
        session.info[_LOCKED] = True
    head = await session.get(Meta, _HEAD)
    if head is None:
        last_id, prev = 0, GENESIS
    else:
        id_text, prev = head.value.split(":", 1)
        last_id = int(id_text)
    new_id = last_id + 1
    when = datetime.now(UTC).isoformat(timespec="microseconds")
    details_text = json.dumps(details, sort_keys=True, separators=(",", ":"))
    digest = record_hash(new_id, when, actor, action, obj, details_text, prev)
    session.add(
        AuditRecord(
            id=new_id,
            time=when,
            actor=actor,
            action=action,
            object=obj,
            details=details_text,
            prev_hash=prev,
            hash=digest,
        )
    )
    checkpointed = signer is not None and (
        new_id == 1 or new_id % CHECKPOINT_EVERY == 0 or action in _ANCHOR_ACTIONS
    )
    if signer is not None and checkpointed:
        session.add(_sign_checkpoint(new_id, digest, signer))
    value = f"{new_id}:{digest}"
    if head is None:
        session.add(Meta(key=_HEAD, value=value))
    else:
        head.value = value
    return AuditEntry(new_id, when, actor, action, obj, details, prev, digest, checkpointed)


async def list_records(
    session: AsyncSession,
    limit: int | None = None,
    *,
    after: int = 0,
    since: str | None = None,
    first: int | None = None,
) -> list[AuditEntry]:
    """Records oldest first: the newest `limit`, or (paging) the `first` with an id above `after` and a
    time at or after `since` (an ISO time as the trail writes them: UTC with microseconds)."""
    stmt = select(AuditRecord).where(AuditRecord.id > after).order_by(AuditRecord.id)
    if since is not None:
        stmt = stmt.where(AuditRecord.time >= since)
    if first is not None:
        stmt = stmt.limit(first)
    rows = (await session.execute(stmt)).scalars().all()
    if limit is not None:
        rows = rows[-limit:]
    return [
        AuditEntry(r.id, r.time, r.actor, r.action, r.object, json.loads(r.details), r.prev_hash, r.hash)
        for r in rows
    ]


async def checkpoint(session: AsyncSession, signer: bytes) -> tuple[int, str] | None:
    """Sign the current head unless it already has a checkpoint (at start and stop); returns (seq, head)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK})
    head = await session.get(Meta, _HEAD)
    if head is None:
        return None
    id_text, digest = head.value.split(":", 1)
    seq = int(id_text)
    if await session.get(AuditCheckpoint, seq) is not None:
        return None
    session.add(_sign_checkpoint(seq, digest, signer))
    return seq, digest


def write_anchor(state_dir: Path, seq: int, head: str) -> None:
    """Keep the newest signed checkpoint outside the database (after its transaction committed)."""
    write_private(state_dir / ANCHOR_FILE, f"{seq} {head}\n")


def read_anchor(state_dir: Path) -> tuple[int, str] | None:
    """The state dir's anchor; None before the first checkpoint. ValueError when it is malformed."""
    try:
        text_ = (state_dir / ANCHOR_FILE).read_text()
    except FileNotFoundError:
        return None
    m = _ANCHOR_RE.match(text_)
    if m is None:
        raise ValueError(f"{state_dir / ANCHOR_FILE} is malformed")
    return int(m.group(1)), m.group(2)


def _describe(cp: AuditCheckpoint) -> str:
    return f"checkpoint at record {cp.seq} (signed {cp.time} with key {cp.key_id})"


def _check_signature(cp: AuditCheckpoint, key: bytes) -> bool:
    try:
        signature = b64decode(cp.signature, length=64)
        VerifyKey(key).verify(_checkpoint_body(cp.seq, cp.head_hash, cp.time, cp.key_id), signature)
    except (ValueError, BadSignatureError):
        return False
    return True


async def verify(session: AsyncSession, trusted: Sequence[bytes] | None = None) -> VerifyResult:
    """Walk the chain: every hash recomputes, links to its predecessor, ids are contiguous, head matches;
    then the checkpoints: signatures, heads, the periodic ones present, the newest by a trusted key.

    `trusted` defaults to the coordinator's signing keys (``session.info[SESSION_KEYS]``)."""
    if trusted is None:
        source: Callable[[], Sequence[bytes]] | None = session.info.get(SESSION_KEYS)
        trusted = source() if source is not None else ()
    anchor_source: Callable[[], tuple[int, str] | None] | None = session.info.get(SESSION_ANCHOR)
    try:
        anchor = anchor_source() if anchor_source is not None else None
    except (OSError, ValueError) as exc:
        return VerifyResult(False, 0, f"cannot read the audit anchor: {exc}")
    by_id = {certfmt.key_id(k): k for k in trusted}
    checkpoints = {
        cp.seq: cp
        for cp in (await session.execute(select(AuditCheckpoint).order_by(AuditCheckpoint.seq))).scalars()
    }
    # periodic checkpoints are required from the oldest one on (a trail from before checkpoints has none)
    first = min(checkpoints) if checkpoints else None
    rows = (await session.execute(select(AuditRecord).order_by(AuditRecord.id))).scalars().all()
    prev = GENESIS
    expected_id = 1
    base = await session.get(Meta, BASE)
    if base is not None:  # retention dropped the oldest records: the chain starts after a signed checkpoint
        problem = _check_base(base.value, checkpoints, by_id, rows)
        if problem is not None:
            return VerifyResult(False, len(rows), problem)
        id_text, prev = base.value.split(":", 1)
        expected_id = int(id_text) + 1
    last_good = expected_id - 1  #: the newest checkpoint so far that matched the chain
    for r in rows:
        if r.id != expected_id:
            return VerifyResult(False, len(rows), f"record {expected_id} is missing")
        if r.prev_hash != prev:
            return VerifyResult(False, len(rows), f"record {r.id} does not link to record {r.id - 1}")
        digest = record_hash(r.id, r.time, r.actor, r.action, r.object, r.details, r.prev_hash)
        if digest != r.hash:
            return VerifyResult(False, len(rows), f"record {r.id} was modified (hash mismatch)")
        cp = checkpoints.get(r.id)
        if cp is not None and cp.key_id in by_id:
            if not _check_signature(cp, by_id[cp.key_id]):
                problem = f"{_describe(cp)} has a bad signature (forged or edited)"
                return VerifyResult(False, len(rows), problem)
            if cp.head_hash != r.hash:
                return VerifyResult(
                    False,
                    len(rows),
                    f"a record in {last_good + 1}..{r.id} was changed and the chain recomputed: "
                    f"it no longer matches the {_describe(cp)}",
                )
            last_good = r.id
        elif cp is None and first is not None and r.id > first and r.id % CHECKPOINT_EVERY == 0:
            return VerifyResult(False, len(rows), f"the signed checkpoint at record {r.id} is missing")
        if anchor is not None and r.id == anchor[0] and r.hash != anchor[1]:
            return VerifyResult(
                False,
                len(rows),
                f"a record in 1..{r.id} was changed and the chain recomputed: it no longer matches the "
                f"checkpoint at record {r.id} kept in the state dir ({ANCHOR_FILE})",
            )
        prev = r.hash
        expected_id += 1
    last_id = expected_id - 1
    if anchor is not None and anchor[0] > last_id:
        problem = f"records after {last_id} were deleted: the state dir's checkpoint is at {anchor[0]}"
        return VerifyResult(False, len(rows), problem)
    head = await session.get(Meta, _HEAD)
    head_value = head.value if head else f"0:{GENESIS}"
    if head_value != f"{expected_id - 1}:{prev}":
        return VerifyResult(False, len(rows), f"the newest records after {expected_id - 1} were deleted")
    if checkpoints:
        newest = checkpoints[max(checkpoints)]
        if newest.seq > last_id:
            return VerifyResult(
                False, len(rows), f"records after {last_id} were deleted: there is a {_describe(newest)}"
            )
        if newest.key_id not in by_id:
            problem = f"the newest {_describe(newest)} is not signed by a key this coordinator trusts"
            return VerifyResult(False, len(rows), problem)
    return VerifyResult(True, len(rows))


def _check_base(
    value: str,
    checkpoints: dict[int, AuditCheckpoint],
    by_id: dict[str, bytes],
    rows: Sequence[AuditRecord],
) -> str | None:
    """The retention base "C:hash" holds when record C's checkpoint is kept, matches (and verifies, if its
    key is still trusted), and the newest ``audit.pruned`` record in the chain names that same base."""
    try:
        id_text, digest = value.split(":", 1)
        seq = int(id_text)
    except ValueError:
        return f"the retention base {value!r} is malformed"
    cp = checkpoints.get(seq)
    if cp is None or cp.head_hash != digest:
        return f"records 1..{seq} were dropped but the checkpoint at record {seq} is missing or differs"
    if cp.key_id in by_id and not _check_signature(cp, by_id[cp.key_id]):
        return f"{_describe(cp)} has a bad signature (forged or edited)"
    pruned = [r for r in rows if r.action == PRUNED]
    if not pruned:
        return f"records 1..{seq} were deleted, and no {PRUNED} record in the chain says so"
    said = json.loads(pruned[-1].details)
    if said.get("through") != seq or said.get("base_hash") != digest:
        newest = pruned[-1].id
        return f"records 1..{seq} were deleted, but the newest {PRUNED} record ({newest}) says otherwise"
    return None


async def checkpoint_count(session: AsyncSession) -> int:
    return int((await session.execute(select(func.count()).select_from(AuditCheckpoint))).scalar() or 0)
