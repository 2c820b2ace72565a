"""Users and pre-auth keys (keys are shown once and stored only as SHA-256)."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from coordinator.core import Core, Tx
from coordinator.db.models import PreAuthKey, User
from coordinator.errors import BadRequest, Conflict, Forbidden, NotFound

KEY_PREFIX = "meshkey-"
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_TAG_RE = re.compile(r"^tag:[a-z0-9][a-z0-9-]{0,62}$|^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True, slots=True)
class UserInfo:
    id: int
    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class NewKey:
    key: str  #: shown once
    prefix: str
    user: str
    reusable: bool
    expires_at: float
    tags: tuple[str, ...]
    ephemeral: bool = False


@dataclass(frozen=True, slots=True)
class RedeemedKey:
    key_id: int
    user_id: int
    user: str
    tags: tuple[str, ...]
    prefix: str
    ephemeral: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_tags(tags: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    for tag in tags:
        if not _TAG_RE.fullmatch(tag):
            raise BadRequest(f"bad tag {tag!r}: use lowercase letters, digits and '-' (optionally tag:NAME)")
    return tuple(dict.fromkeys(tags))


async def create_user(core: Core, name: str, actor: str) -> UserInfo:
    if not _USER_RE.fullmatch(name):
        raise BadRequest(f"bad user name {name!r}: letters, digits and . _ @ - only, at most 64")
    try:
        async with core.transaction() as tx:
            exists = (await tx.session.execute(select(User).where(User.name == name))).scalar_one_or_none()
            if exists is not None:
                raise Conflict(f"user {name!r} already exists")
            user = User(name=name, created_at=time.time())
            tx.session.add(user)
            await tx.session.flush()
            await tx.audit(actor, "user.created", f"user:{name}")
    except IntegrityError:
        raise Conflict(f"user {name!r} already exists") from None
    return UserInfo(user.id, user.name, user.created_at)


async def list_users(core: Core) -> list[UserInfo]:
    async with core.read() as s:
        rows = (await s.execute(select(User).order_by(User.id))).scalars().all()
    return [UserInfo(u.id, u.name, u.created_at) for u in rows]


async def create_key(
    core: Core,
    user: str,
    reusable: bool,
    expiration: float,
    tags: list[str],
    actor: str,
    ephemeral: bool = False,
) -> NewKey:
    clean_tags = check_tags(tags)
    policy = core.state.parsed_policy
    for tag in clean_tags if policy is not None else ():
        assert policy is not None
        if not policy.may_assign(user, tag):
            raise Forbidden(
                f"user {user!r} may not assign {tag!r}: the policy's [tag_owners] does not allow it"
            )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    async with core.transaction() as tx:
        owner = (await tx.session.execute(select(User).where(User.name == user))).scalar_one_or_none()
        if owner is None:
            raise NotFound(f"unknown user {user!r}")
        row = PreAuthKey(
            user_id=owner.id,
            key_hash=hash_key(key),
            prefix=key[: len(KEY_PREFIX) + 6],
            reusable=reusable,
            tags=json.dumps(list(clean_tags)),
            created_at=now,
            expires_at=now + expiration,
            used_count=0,
            ephemeral=ephemeral,
        )
        tx.session.add(row)
        await tx.session.flush()
        await tx.audit(
            actor,
            "key.created",
            f"key:{row.id}",
            {
                "user": user,
                "reusable": reusable,
                "expires_at": row.expires_at,
                "tags": list(clean_tags),
                "key_prefix": row.prefix,
                **({"ephemeral": True} if ephemeral else {}),
            },
        )
    return NewKey(key, row.prefix, user, reusable, row.expires_at, clean_tags, ephemeral)


@dataclass(frozen=True, slots=True)
class _KeyRow:
    id: int
    user_id: int
    expires_at: float
    reusable: bool
    tags: tuple[str, ...]
    prefix: str
    ephemeral: bool


_KEY_ROWS = "redeem_key.rows"  #: session.info: key hash -> _KeyRow, read once per transaction
_USES = "redeem_key.uses"  #: session.info: reusable key id -> uses to add at the commit


async def redeem_key(tx: Tx, key: str, now: float) -> RedeemedKey:
    """Use a key inside the enrollment transaction; a single-use key is consumed by one atomic UPDATE.

    Many enrollments share one transaction (coordinator/groupcommit.py): the key's row is read once per
    transaction, and a reusable key's use count is added up and written once, just before the commit.
    Nothing here autoflushes: the group's rows go to the database together at the commit."""
    s = tx.session
    digest = hash_key(key)
    rows: dict[str, _KeyRow] = s.info.setdefault(_KEY_ROWS, {})
    row = rows.get(digest)
    if row is None:
        with s.no_autoflush:
            found = (
                await s.execute(select(PreAuthKey).where(PreAuthKey.key_hash == digest))
            ).scalar_one_or_none()
        if found is None:
            raise Forbidden("unknown pre-auth key")
        row = rows[digest] = _KeyRow(
            found.id,
            found.user_id,
            found.expires_at,
            bool(found.reusable),
            tuple(json.loads(found.tags)),
            found.prefix,
            bool(found.ephemeral),
        )
    if row.expires_at <= now:
        raise Forbidden("pre-auth key expired")
    if row.reusable:
        uses: dict[int, int] = s.info.setdefault(_USES, {})
        if not uses:
            tx.before_commit(lambda: _count_uses(tx, uses))
        uses[row.id] = uses.get(row.id, 0) + 1
    else:
        stmt = update(PreAuthKey).where(PreAuthKey.id == row.id, PreAuthKey.used_count == 0)
        with s.no_autoflush:
            result = await s.execute(
                stmt.values(used_count=PreAuthKey.used_count + 1).execution_options(synchronize_session=False)
            )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise Forbidden("pre-auth key already used")
    with s.no_autoflush:
        owner = await s.get(User, row.user_id)
    assert owner is not None
    await tx.audit(f"key:{row.id}", "key.used", f"key:{row.id}", {"user": owner.name})
    return RedeemedKey(row.id, owner.id, owner.name, row.tags, row.prefix, row.ephemeral)


async def _count_uses(tx: Tx, uses: dict[int, int]) -> None:
    for key_id, n in uses.items():
        await tx.session.execute(
            update(PreAuthKey)
            .where(PreAuthKey.id == key_id)
            .values(used_count=PreAuthKey.used_count + n)
            .execution_options(synchronize_session=False)
        )
