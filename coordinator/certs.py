"""The coordinator's Ed25519 signing keys and node certificate issuance (format: meshd.proto.cert)."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from meshd.proto import cert as certfmt
from meshd.proto import trust
from meshd.proto.encoding import b64decode, b64encode


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """The active key (issues certificates) and every key peers should trust (active first)."""

    active_seed: bytes
    trusted: tuple[bytes, ...]
    endorsements: tuple[trust.AnnouncedKey, ...] = ()  #: rotated-in keys signed by their predecessor

    def announced(self) -> tuple[trust.AnnouncedKey, ...]:
        """Every trusted key with its endorsement if any (GET /api/v1/signing-keys), active first."""
        by_key = {a.key: a for a in self.endorsements}
        return tuple(by_key.get(k, trust.AnnouncedKey(k)) for k in self.trusted)

    @property
    def active_public(self) -> bytes:
        return _public_of(self.active_seed)  # every enrollment's answer names it: derived once per seed

    @property
    def active_id(self) -> str:
        return certfmt.key_id(self.active_public)


@functools.lru_cache(maxsize=8)
def _public_of(seed: bytes) -> bytes:
    return bytes(SigningKey(seed).verify_key)


def load_or_create(state_dir: Path) -> SigningKeys:
    """Read `<state>/signing_key` (base64 seed, 0600), creating it on first start.

    Older keys kept during a rotation live in `<state>/trusted_keys` (one base64 public key per line,
    optionally followed by the unix time its overlap ends: it is dropped after that); endorsements of
    rotated-in keys in `<state>/endorsements` (``new signer signature``, base64, one per line).
    """
    path = state_dir / "signing_key"
    if not path.exists():
        # atomic: a crash mid-write used to leave an empty signing_key that blocked every later start
        write_private(path, b64encode(os.urandom(32)) + "\n")
    seed = b64decode(path.read_text().strip(), length=32, what=str(path))
    os.chmod(path, 0o600)
    active = bytes(SigningKey(seed).verify_key)
    trusted = [active]
    for key, until in read_trusted(state_dir):
        if key not in trusted and (until is None or until > time.time()):
            trusted.append(key)
    endorsements = []
    path = state_dir / "endorsements"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                new, signer, sig = line.split()
                endorsements.append(
                    trust.AnnouncedKey(
                        b64decode(new, length=32), b64decode(signer, length=32), b64decode(sig, length=64)
                    )
                )
    return SigningKeys(active_seed=seed, trusted=tuple(trusted), endorsements=tuple(endorsements))


def read_trusted(state_dir: Path) -> list[tuple[bytes, float | None]]:
    extra = state_dir / "trusted_keys"
    out: list[tuple[bytes, float | None]] = []
    if extra.exists():
        for line in extra.read_text().splitlines():
            parts = line.split()
            if parts:
                key = b64decode(parts[0], length=32, what=str(extra))
                out.append((key, float(parts[1]) if len(parts) > 1 else None))
    return out


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, mode 0600 whatever the umask, crash-safe like meshd's state.json.

    Temporary file, fsync, rename, fsync of the directory: after a crash or power loss `path` holds the
    old text or the new one, never a truncated mix (the rename alone may be reordered before the data)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(text.encode())
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def rotate(state_dir: Path, keys: SigningKeys, overlap: float, now: float) -> SigningKeys:
    """A new active key, endorsed by the old one; the old key stays trusted for `overlap` seconds.

    Written in crash-safe order: trusted_keys and endorsements first, signing_key last (a crash before
    it leaves the old key active and merely an unused extra entry)."""
    seed = os.urandom(32)
    new_pub = bytes(SigningKey(seed).verify_key)
    kept = [(k, u) for k, u in read_trusted(state_dir) if (u is None or u > now) and k != new_pub]
    kept = [(k, u) for k, u in kept if k != keys.active_public] + [(keys.active_public, now + overlap)]
    write_private(
        state_dir / "trusted_keys",
        "".join(f"{b64encode(k)}{'' if u is None else f' {u:.3f}'}\n" for k, u in kept),
    )
    endorsement = trust.AnnouncedKey(new_pub, keys.active_public, trust.endorse(keys.active_seed, new_pub))
    live = {k for k, _ in kept} | {new_pub}
    endorsements = [a for a in keys.endorsements if a.key in live] + [endorsement]
    write_private(
        state_dir / "endorsements",
        "".join(
            f"{b64encode(a.key)} {b64encode(a.endorsed_by or b'')} {b64encode(a.signature or b'')}\n"
            for a in endorsements
        ),
    )
    write_private(state_dir / "signing_key", b64encode(seed) + "\n")
    return load_or_create(state_dir)


def issue_node_cert(
    keys: SigningKeys,
    *,
    serial: int,
    name: str,
    node_id: int,
    ips: tuple[str, ...],
    wg_public_key: str,
    node_public_key: str,
    tags: tuple[str, ...],
    now: float,
    lifetime: float,
) -> tuple[str, certfmt.CertPayload]:
    """A certificate valid from a minute ago (clock skew) for `lifetime` seconds."""
    payload = certfmt.CertPayload(
        version=certfmt.CERT_VERSION,
        serial=serial,
        name=name,
        node_id=node_id,
        ips=ips,
        wg_public_key=wg_public_key,
        node_public_key=node_public_key,
        tags=tags,
        not_before=int(now) - 60,
        not_after=int(now + lifetime),
        issuer=keys.active_id,
    )
    return certfmt.issue(payload, keys.active_seed), payload
