"""Signed-request authentication for node endpoints (envelope: meshd.proto.signing)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from sqlalchemy.exc import IntegrityError
from starlette.datastructures import URL

from coordinator.core import Core
from coordinator.db.models import Nonce
from coordinator.errors import Forbidden, Unauthorized
from meshd.proto import signing


def target_of(url: URL) -> str:
    return url.path + (f"?{url.query}" if url.query else "")


async def remember_nonce(core: Core, scope: str, envelope: signing.SignedHeaders) -> None:
    """Store the nonce for the window; a second use is a replay (works across replicas sharing the DB)."""
    try:
        async with core.transaction() as tx:
            tx.session.add(
                Nonce(
                    nonce=f"{scope}:{envelope.nonce}",
                    expires_at=envelope.timestamp + signing.WINDOW_SECONDS + 1,
                )
            )
    except IntegrityError:
        raise Unauthorized("replayed request: nonce already used") from None


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
