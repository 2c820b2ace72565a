"""Machines waiting for approval (enrolled without a pre-auth key): the list the dashboard's Approvals
page, ``GET /admin/pending`` and ``coordinator nodes pending`` show."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select

from coordinator.core import Core
from coordinator.db.models import PendingEnrollment
from coordinator.enrollment import audit_hostname

#: at most this many are listed (the oldest first); enrollment caps the pending rows in total anyway
MAX_LISTED = 1000


@dataclass(frozen=True, slots=True)
class Waiting:
    code: str
    #: the hostname the machine asked for, made DNS-label-safe: an unauthenticated client chose it, so it
    #: is shown the way the audit trail records it (no control characters or markup reach a terminal)
    hostname: str
    node_public_key: str
    created_at: float
    expires_at: float


async def list_pending(core: Core, now: float | None = None) -> list[Waiting]:
    """Enrollments not yet approved and not expired, oldest first."""
    now = time.time() if now is None else now
    async with core.read() as s:
        rows = (
            (
                await s.execute(
                    select(PendingEnrollment)
                    .where(PendingEnrollment.node_id.is_(None), PendingEnrollment.expires_at > now)
                    .order_by(PendingEnrollment.created_at)
                    .limit(MAX_LISTED)
                )
            )
            .scalars()
            .all()
        )
    return [
        Waiting(r.code, audit_hostname(r.hostname), r.node_public_key, r.created_at, r.expires_at)
        for r in rows
    ]
