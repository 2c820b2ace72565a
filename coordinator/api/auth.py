"""Signed-request authentication for node endpoints (envelope: meshd.proto.signing)."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.datastructures import URL

from coordinator.core import Core
from coordinator.db.models import Nonce
from coordinator.errors import Forbidden, Unauthorized
from meshd.proto import signing


def target_of(url: URL) -> str:
    return url.path + (f"?{url.query}" if url.query else "")


async def remember_nonce(core: Core, scope: str, envelope: signing.SignedHeaders) -> None:
    """Store the nonce for the window; a second use is a replay (works across replicas sharing the DB).

    Group commit (issue 16): nonces of requests that arrive while a write is under way are stored
    together in the next transaction, so a burst of stream handshakes (a restart storm) costs one
    fsync'd commit per batch instead of one per request."""
    writer = _nonce_writers.get(core)
    if writer is None:
        writer = _nonce_writers[core] = _NonceWriter(core)
    await writer.remember(f"{scope}:{envelope.nonce}", envelope.timestamp + signing.WINDOW_SECONDS + 1)


class _NonceWriter:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.waiting: dict[str, tuple[float, asyncio.Future[bool]]] = {}
        self.task: asyncio.Task[None] | None = None

    async def remember(self, key: str, expires_at: float) -> None:
        if key in self.waiting:
            raise Unauthorized("replayed request: nonce already used")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiting[key] = (expires_at, done)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._flush(), name="nonce-writer")
        if not await done:
            raise Unauthorized("replayed request: nonce already used")

    async def _flush(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting, {}
            try:
                async with self.core.transaction() as tx:
                    stored = set(
                        (await tx.session.execute(select(Nonce.nonce).where(Nonce.nonce.in_(list(batch)))))
                        .scalars()
                        .all()
                    )
                    for key, (expires_at, _) in batch.items():
                        if key not in stored:
                            tx.session.add(Nonce(nonce=key, expires_at=expires_at))
            except Exception as exc:  # every request of the batch fails as its own transaction would have
                for _, done in batch.values():
                    if not done.done():
                        done.set_exception(
                            Unauthorized("replayed request: nonce already used")
                            if isinstance(exc, IntegrityError)
                            else exc
                        )
                continue
            for key, (_, done) in batch.items():
                if not done.done():
                    done.set_result(key not in stored)


_nonce_writers: weakref.WeakKeyDictionary[Core, _NonceWriter] = weakref.WeakKeyDictionary()


def envelope_of(headers: Mapping[str, str]) -> signing.SignedHeaders:
    try:
        return signing.parse_headers(headers)
    except signing.SignatureError as exc:
        raise Unauthorized(str(exc)) from None


async def authenticate_node(
    core: Core, headers: Mapping[str, str], method: str, url: URL, body: bytes
) -> int:
    """The id of the enrolled node that signed this request, or Unauthorized/Forbidden."""
    envelope = envelope_of(headers)
    if not envelope.node.isdigit():
        raise Unauthorized("unknown node")
    node_id = int(envelope.node)
    entry = core.node_keys.get(node_id)
    if entry is None:
        raise Unauthorized("unknown node")
    key, expired = entry
    try:
        signing.verify_request(envelope, key, method, target_of(url), body, time.time())
    except signing.SignatureError as exc:
        raise Unauthorized(str(exc)) from None
    if expired:
        raise Forbidden("node expired: re-enroll it")
    await remember_nonce(core, str(node_id), envelope)
    return node_id


async def authenticate_key(
    core: Core, key: bytes, scope: str, headers: Mapping[str, str], method: str, url: URL, body: bytes
) -> None:
    """Verify a request signed by a known key (e.g. a pending enrollment's node key)."""
    envelope = envelope_of(headers)
    try:
        signing.verify_request(envelope, key, method, target_of(url), body, time.time())
    except signing.SignatureError as exc:
        raise Unauthorized(str(exc)) from None
    await remember_nonce(core, scope, envelope)
