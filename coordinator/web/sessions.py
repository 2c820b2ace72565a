"""Dashboard sessions: a random cookie value maps to a token id and a CSRF secret (sans-IO, ``now`` given).

The cookie never holds the token itself. Each request re-checks the token (coordinator/tokens.py), so a
revoked or expired token ends its sessions at once. Sessions live in this process's memory: a restart
(or another replica) asks for the token again.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

IDLE = 12 * 3600.0  #: a session unused this long is forgotten
MAX_SESSIONS = 1000  #: beyond this the least recently used session is dropped


@dataclass(frozen=True, slots=True)
class Session:
    token_id: int
    scope: str
    csrf: str = field(repr=False)


class Sessions:
    def __init__(self, idle: float = IDLE, limit: int = MAX_SESSIONS) -> None:
        self.idle, self.limit = idle, limit
        self._by_id: OrderedDict[str, tuple[Session, float]] = OrderedDict()

    def open(self, token_id: int, scope: str, now: float) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(token_id, scope, secrets.token_urlsafe(32))
        self._by_id[sid] = (session, now)
        while len(self._by_id) > self.limit:
            self._by_id.popitem(last=False)
        return sid, session

    def get(self, sid: str | None, now: float) -> Session | None:
        if not sid:
            return None
        entry = self._by_id.get(sid)
        if entry is None:
            return None
        session, seen = entry
        if now - seen > self.idle:
            del self._by_id[sid]
            return None
        self._by_id[sid] = (session, now)
        self._by_id.move_to_end(sid)
        return session

    def close(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two secrets; a missing one never matches."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())
