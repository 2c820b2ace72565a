"""Audit retention: ``coordinator serve --audit-retention 400d`` drops records older than that.

A hash chain cannot simply lose its head end: the oldest kept record links to one that is gone. So the
trail is cut only at a signed checkpoint (coordinator/audit.py makes one every 100 records, at every start
and stop and at key rotations): records 1..C go, where C is the newest checkpointed record older than the
limit, and

* record C's checkpoint is kept (it signs C's hash, which the first kept record links to),
* ``meta.audit_base`` becomes "C:<hash of C>", where ``audit verify`` starts walking,
* an ``audit.pruned`` record (through C, how many records, the limit, C's hash) is appended to the chain.

``audit verify`` accepts the cut only when all three agree, so deleting more of the trail than retention
did, or moving the base, is still reported: the ``audit.pruned`` record is itself chained and signed by
the following checkpoints. Records newer than the limit are never dropped; so up to ~100 records (one
checkpoint interval) older than the limit may stay until the next cut.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select

from coordinator.audit import BASE, PRUNED
from coordinator.db.models import AuditCheckpoint, AuditRecord, Meta

if TYPE_CHECKING:
    from coordinator.core import Core, Tx

log = logging.getLogger("coordinator")

EVERY = 3600.0  #: seconds between retention runs (a run with nothing to drop writes nothing)


@dataclass(frozen=True, slots=True)
class Pruned:
    through: int  #: records 1..through are gone
    records: int  #: how many were deleted by this run


async def prune(tx: Tx, before: datetime) -> Pruned | None:
    """Drop the records up to the newest checkpointed record older than ``before``; None: nothing to do."""
    s = tx.session
    limit = before.astimezone(UTC).isoformat(timespec="microseconds")
    base = await s.get(Meta, BASE)
    floor = int(base.value.split(":", 1)[0]) if base is not None else 0
    newest = (await s.execute(select(func.max(AuditRecord.id)))).scalar()
    seq = (
        await s.execute(
            select(func.max(AuditCheckpoint.seq))
            .join(AuditRecord, AuditRecord.id == AuditCheckpoint.seq)
            .where(AuditRecord.time < limit, AuditCheckpoint.seq > floor)
        )
    ).scalar()
    if seq is None or newest is None:
        return None
    cut = await s.get(AuditRecord, seq)
    assert cut is not None
    gone = (
        await s.execute(select(func.count()).select_from(AuditRecord).where(AuditRecord.id <= seq))
    ).scalar()
    await s.execute(delete(AuditRecord).where(AuditRecord.id <= seq))
    await s.execute(delete(AuditCheckpoint).where(AuditCheckpoint.seq < seq))
    value = f"{seq}:{cut.hash}"
    if base is None:
        s.add(Meta(key=BASE, value=value))
    else:
        base.value = value
    details = {"through": seq, "records": int(gone or 0), "before": limit, "base_hash": cut.hash}
    await tx.audit("coordinator", PRUNED, "audit", details)
    return Pruned(seq, int(gone or 0))


async def run(core: Core, keep: float, every: float = EVERY) -> None:
    """The retention loop: drop what is older than ``keep`` seconds, now and then every ``every`` s."""
    while True:
        try:
            async with core.transaction() as tx:
                done = await prune(tx, datetime.now(UTC) - timedelta(seconds=keep))
            if done is not None:
                log.info("audit retention: dropped %d records (1..%d)", done.records, done.through)
        except Exception:  # retried at the next run; the trail only grows meanwhile
            log.exception("audit retention failed")
        await asyncio.sleep(every)
