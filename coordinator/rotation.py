"""Key rotation: a node's WireGuard key (proof of possession, like enrollment) and the coordinator's
certificate signing key (overlap period, every certificate re-issued).

WireGuard key (``meshd rotate-keys``):

1. ``POST /api/v1/register/challenge`` -> a single-use challenge and a fresh server X25519 key.
2. ``POST /api/v1/keys/rotate`` (a signed node request, so the node key authorises it) carries the new
   WireGuard public key, the challenge and a NaCl box of the challenge made with the *new* WireGuard
   private key and the server's ephemeral key: only the holder of the new private key can make it.
3. The coordinator stores the key, re-issues the node certificate (it names the WireGuard key), publishes
   the node as "changed" (peers replace the WireGuard peer through the map stream) and audits
   ``node.key_rotated``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select

from coordinator import certs
from coordinator.core import Core
from coordinator.db.models import Node
from coordinator.enrollment import open_challenge, proves_key, take_challenge
from coordinator.errors import BadRequest, Conflict, Forbidden, Unauthorized
from coordinator.nodes import _reissue_and_publish
from meshd.proto.encoding import b64decode


@dataclass(frozen=True, slots=True)
class KeyRotation:
    """A node's request to replace its WireGuard key (all base64)."""

    wg_public_key: str
    challenge: str
    box: str


async def rotate_wg_key(core: Core, node_id: int, req: KeyRotation) -> str:
    """Check the proof of possession of the new key, store it, re-issue and publish; the new cert."""
    try:
        wg = b64decode(req.wg_public_key, length=32, what="wg_public_key")
        challenge = b64decode(req.challenge, length=32, what="challenge")
        box = b64decode(req.box, what="box")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    now = time.time()
    opened = open_challenge(core, challenge, now)  # stateless (coordinator/challenges.py), or a legacy row
    async with core.transaction() as tx:
        ephemeral = await take_challenge(tx, opened, challenge, now)
        if not isinstance(ephemeral, Unauthorized):
            if not proves_key(ephemeral, wg, challenge, box):
                raise Unauthorized(
                    "bad proof of the new WireGuard key: the box does not open to the challenge"
                )
            node = await tx.session.get(Node, node_id)
            if node is None or node.expired:
                raise Forbidden("node removed or expired: re-enroll it")
            if node.wg_public_key == req.wg_public_key:
                raise Conflict("the new WireGuard key is the current one")
            clash = (
                await tx.session.execute(select(Node.id).where(Node.wg_public_key == req.wg_public_key))
            ).first()
            if clash is not None:
                raise Conflict("this WireGuard key is already enrolled")
            old = node.wg_public_key
            node.wg_public_key = req.wg_public_key
            await tx.session.flush()
            await tx.audit(
                f"node:{node.name}",
                "node.key_rotated",
                f"node:{node.name}",
                {"node_id": node.id, "old_wg_public_key": old, "wg_public_key": req.wg_public_key},
            )
            await _reissue_and_publish(tx, node)
            return node.cert
    # the consumed expired challenge is committed before we complain
    raise Unauthorized("challenge expired: request a new one")


@dataclass(frozen=True, slots=True)
class SigningRotation:
    key_id: str
    previous_key_id: str
    trusted_until: float  #: the old key is dropped after this (unix seconds)
    reissued: int  #: certificates re-issued with the new key


async def rotate_signing_key(core: Core, overlap: float | None, actor: str) -> SigningRotation:
    """Make a new signing key (endorsed by the old one, which stays trusted for `overlap`, default the
    certificate lifetime so every certificate it signed expires first) and re-issue every certificate.

    Nodes learn the new key when the stream brings certificates from an issuer they do not know yet:
    they fetch ``GET /api/v1/signing-keys`` and accept keys endorsed by a key they trust
    (meshd.proto.trust)."""
    overlap = core.settings.cert_lifetime if overlap is None else overlap
    if overlap < 0:
        raise BadRequest("overlap must not be negative")
    now = time.time()
    async with core.transaction() as tx:
        previous = core.keys
        core.keys = certs.rotate(core.settings.state_dir, previous, overlap, now)
        await core.share_secrets(tx)  # replicas (issue 16): the other replicas take the new key
        # on a failed commit the new key stays active: certificates are re-issued at renewal anyway
        rows = (await tx.session.execute(select(Node).where(Node.expired.is_(False)))).scalars().all()
        for node in rows:
            await _reissue_and_publish(tx, node)
        await tx.audit(
            actor,
            "signing_key.rotated",
            "coordinator",
            {
                "key_id": core.keys.active_id,
                "previous_key_id": previous.active_id,
                "trusted_until": int(now + overlap),
                "reissued": len(rows),
            },
        )
    return SigningRotation(core.keys.active_id, previous.active_id, now + overlap, len(rows))
