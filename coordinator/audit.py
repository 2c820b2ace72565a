"""Append-only, hash-chained audit trail.

Each record's hash is SHA-256 over the canonical JSON of (id, time, actor, action, object, details,
prev_hash); the newest hash and id are kept in `meta` so deleting the last records is detected too.
Appends happen inside the caller's transaction under the coordinator's write lock (and, on PostgreSQL,
a transaction-scoped advisory lock) so the chain never forks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator.db.models import AuditRecord, Meta
from meshd.proto.encoding import canonical_json

GENESIS = "0" * 64
_HEAD = "audit_head"
_ADVISORY_LOCK = 0x6D657368  # "mesh"

_SECRET_WORDS = ("key", "secret", "token", "password", "private")


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


async def append(
    session: AsyncSession, actor: str, action: str, obj: str, details: dict[str, Any] | None = None
) -> AuditEntry:
    """Add one record to the chain in the current transaction."""
    details = details or {}
    _check_no_secrets(details)
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK})
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
    value = f"{new_id}:{digest}"
    if head is None:
        session.add(Meta(key=_HEAD, value=value))
    else:
        head.value = value
    return AuditEntry(new_id, when, actor, action, obj, details, prev, digest)


async def list_records(session: AsyncSession, limit: int | None = None) -> list[AuditEntry]:
    stmt = select(AuditRecord).order_by(AuditRecord.id)
    rows = (await session.execute(stmt)).scalars().all()
    if limit is not None:
        rows = rows[-limit:]
    return [
        AuditEntry(r.id, r.time, r.actor, r.action, r.object, json.loads(r.details), r.prev_hash, r.hash)
        for r in rows
    ]


async def verify(session: AsyncSession) -> VerifyResult:
    """Walk the chain: every hash recomputes, links to its predecessor, ids are contiguous, head matches."""
    rows = (await session.execute(select(AuditRecord).order_by(AuditRecord.id))).scalars().all()
    prev = GENESIS
    expected_id = 1
    for r in rows:
        if r.id != expected_id:
            return VerifyResult(False, len(rows), f"record {expected_id} is missing")
        if r.prev_hash != prev:
            return VerifyResult(False, len(rows), f"record {r.id} does not link to record {r.id - 1}")
        digest = record_hash(r.id, r.time, r.actor, r.action, r.object, r.details, r.prev_hash)
        if digest != r.hash:
            return VerifyResult(False, len(rows), f"record {r.id} was modified (hash mismatch)")
        prev = r.hash
        expected_id += 1
    head = await session.get(Meta, _HEAD)
    head_value = head.value if head else f"0:{GENESIS}"
    if head_value != f"{expected_id - 1}:{prev}":
        return VerifyResult(False, len(rows), f"the newest records after {expected_id - 1} were deleted")
    return VerifyResult(True, len(rows))
