"""Secrets every replica must agree on, kept in the database sealed with an at-rest key (issue 16).

The certificate signing key (with the rotation's ``trusted_keys`` and ``endorsements``) and the relay
secret used to be files in each replica's state dir, copied by hand. With an at-rest key
(``--secrets-key-file FILE`` or ``$COORDINATOR_SECRETS_KEY``: 32 random bytes, base64, made by
``coordinator secrets new-key``) they live in the ``shared_secrets`` table instead, each sealed with a NaCl
SecretBox: the first replica seals its files (made if missing) into the table, every later one unseals
them into its state dir, where the rest of the coordinator reads them as before (the state dir stays the
replica's private 0700 cache; the database, its replicas and backups hold only ciphertext).

Failing closed, in one line each: a database that holds sealed secrets and no key given; a key that is not
the one they were sealed with (each row keeps the key's id); a state dir whose signing key differs from the
shared one (a replica that already signed certificates with another key must not switch silently). Without
a key and with no sealed rows nothing changes (SQLite, one replica: the files as before).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.secret import SecretBox
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator import certs
from coordinator.db.models import SharedSecret
from coordinator.errors import CoordinatorError
from coordinator.relay import secret as relay_secret

log = logging.getLogger("coordinator")

KEY_ENV = "COORDINATOR_SECRETS_KEY"
#: secret name -> its file in the state dir. An absent file is stored as "" (and "" removes the file).
FILES: Mapping[str, str] = {
    "signing_key": "signing_key",
    "trusted_keys": "trusted_keys",
    "endorsements": "endorsements",
    "relay_secret": "relay.secret",
}
#: these must be present (non-empty) in a complete set
REQUIRED = ("signing_key", "relay_secret")


class SecretsError(CoordinatorError):
    """The at-rest key is missing, malformed or wrong, or the shared secrets disagree with the state dir."""


@dataclass(frozen=True, slots=True)
class AtRestKey:
    key: bytes  #: 32 bytes
    source: str  #: where it came from, for messages (never the key itself)

    @property
    def id(self) -> str:
        """A public fingerprint: tells a wrong key from a corrupt row without revealing the key."""
        return hashlib.blake2b(self.key, digest_size=8, person=b"mesh-at-rest").hexdigest()

    def seal(self, name: str, value: str) -> str:
        # the name is sealed with the value: a row copied over another's name does not open as that one
        plain = json.dumps({"name": name, "value": value}).encode()
        return base64.b64encode(SecretBox(self.key).encrypt(plain)).decode()

    def open(self, name: str, sealed: str) -> str:
        try:
            doc = json.loads(SecretBox(self.key).decrypt(base64.b64decode(sealed, validate=True)))
        except (CryptoError, binascii.Error, ValueError) as exc:
            raise SecretsError(
                f"shared secret {name!r} does not open with the key from {self.source}"
            ) from exc
        if not isinstance(doc, dict) or doc.get("name") != name or not isinstance(doc.get("value"), str):
            raise SecretsError(f"shared secret {name!r} in the database is not the secret of that name")
        return str(doc["value"])


def new_key_text() -> str:
    """A fresh at-rest key as the text `--secrets-key-file` and `$COORDINATOR_SECRETS_KEY` take."""
    return base64.b64encode(os.urandom(SecretBox.KEY_SIZE)).decode()


def parse_key(text: str, source: str) -> AtRestKey:
    value = text.strip()
    try:
        raw = base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != SecretBox.KEY_SIZE:
        raise SecretsError(
            f"secrets key from {source} is not 32 bytes of base64: make one with"
            " `coordinator secrets new-key`"
        )
    return AtRestKey(raw, source)


def key_from(key_file: Path | None, env: Mapping[str, str] | None = None) -> AtRestKey | None:
    """The at-rest key from `key_file` (``--secrets-key-file``) or else ``$COORDINATOR_SECRETS_KEY``."""
    env = os.environ if env is None else env
    if key_file is not None:
        try:
            return parse_key(key_file.read_text(), str(key_file))
        except OSError as exc:
            raise SecretsError(f"cannot read the secrets key {key_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise SecretsError(f"secrets key {key_file} is not text") from None
    text = env.get(KEY_ENV)
    return parse_key(text, f"${KEY_ENV}") if text else None


async def read_rows(session: AsyncSession) -> dict[str, SharedSecret]:
    return {r.name: r for r in (await session.execute(select(SharedSecret))).scalars().all()}


def _read_file(state_dir: Path, name: str) -> str:
    path = state_dir / FILES[name]
    return path.read_text() if path.exists() else ""


def _write_file(state_dir: Path, name: str, value: str) -> None:
    path = state_dir / FILES[name]
    if not value:
        path.unlink(missing_ok=True)
    elif not path.exists() or path.read_text() != value:
        certs.write_private(path, value)


async def store(session: AsyncSession, state_dir: Path, key: AtRestKey, names: tuple[str, ...]) -> None:
    """Seal the state dir's files `names` into the table (inside the caller's transaction)."""
    rows = await read_rows(session)
    if any(r.key_id != key.id for r in rows.values()):
        raise SecretsError(
            "the shared secrets were re-sealed with another key (`coordinator secrets rekey`): "
            "restart this replica with the new key first"
        )
    now = time.time()
    for name in names:
        sealed = key.seal(name, _read_file(state_dir, name))
        row = rows.get(name)
        if row is None:
            session.add(SharedSecret(name=name, key_id=key.id, sealed=sealed, updated_at=now))
        else:
            row.key_id, row.sealed, row.updated_at = key.id, sealed, now


async def unseal_all(session: AsyncSession, key: AtRestKey) -> dict[str, str]:
    rows = await read_rows(session)
    wrong = {r.key_id for r in rows.values() if r.key_id != key.id}
    if wrong:
        raise SecretsError(
            f"the secrets key from {key.source} (id {key.id}) is not the one the database's shared secrets "
            f"were sealed with (id {', '.join(sorted(wrong))}); give that key"
        )
    return {name: key.open(name, row.sealed) for name, row in rows.items()}


async def sync(session: AsyncSession, state_dir: Path, key: AtRestKey | None) -> bool:
    """At start, in the replicas' write lock: share this replica's secrets (first replica) or take the
    shared ones into the state dir (every later one). False when secrets are not shared (no key, no rows)."""
    rows = await read_rows(session)
    if key is None:
        if rows:
            raise SecretsError(
                "the database holds shared secrets sealed at rest: give --secrets-key-file FILE "
                f"or ${KEY_ENV} (the key the first replica was started with)"
            )
        return False
    if not rows:
        # the first replica: its own files (made now if this is a new network) become the shared ones
        certs.load_or_create(state_dir)
        relay_secret.load_or_create(state_dir)
        await store(session, state_dir, key, tuple(FILES))
        return True
    values = await unseal_all(session, key)
    missing = [n for n in REQUIRED if not values.get(n)]
    if missing:
        raise SecretsError(
            f"shared secrets in the database lack {', '.join(missing)}: restore them from a backup"
        )
    local = _read_file(state_dir, "signing_key").strip()
    if local and local != values["signing_key"].strip():
        raise SecretsError(
            f"{state_dir / 'signing_key'} is not the shared signing key in the database: move it away to use "
            "the shared one (nodes trust the shared key), or restore the database"
        )
    local_relay = _read_file(state_dir, "relay_secret").strip()
    if local_relay and local_relay != values["relay_secret"].strip():
        # serve made one before the database was read (a new replica), or it was this replica's own
        log.info(
            "relay.secret replaced by the shared one: standalone relays use %s", state_dir / "relay.secret"
        )
    write_all(state_dir, values)
    return True


def write_all(state_dir: Path, values: Mapping[str, str]) -> None:
    for name in FILES:
        if name in values:
            _write_file(state_dir, name, values[name])


async def rekey(session: AsyncSession, old: AtRestKey, new: AtRestKey) -> int:
    """Re-seal every shared secret with `new` (one transaction: all or none); the number re-sealed."""
    values = await unseal_all(session, old)
    rows = await read_rows(session)
    now = time.time()
    for name, value in values.items():
        rows[name].key_id, rows[name].sealed, rows[name].updated_at = new.id, new.seal(name, value), now
    return len(values)
