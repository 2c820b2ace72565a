"""The coordinator's Ed25519 signing keys and node certificate issuance (format: meshd.proto.cert)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from meshd.proto import cert as certfmt
from meshd.proto.encoding import b64decode, b64encode


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """The active key (issues certificates) and every key peers should trust (active first)."""

    active_seed: bytes
    trusted: tuple[bytes, ...]

    @property
    def active_public(self) -> bytes:
        return bytes(SigningKey(self.active_seed).verify_key)

    @property
    def active_id(self) -> str:
        return certfmt.key_id(self.active_public)


def load_or_create(state_dir: Path) -> SigningKeys:
    """Read `<state>/signing_key` (base64 seed, 0600), creating it on first start.

    Older keys kept during a rotation live in `<state>/trusted_keys` (one base64 public key per line).
    """
    path = state_dir / "signing_key"
    if not path.exists():
        seed = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(b64encode(seed) + "\n")
    seed = b64decode(path.read_text().strip(), length=32, what=str(path))
    os.chmod(path, 0o600)
    active = bytes(SigningKey(seed).verify_key)
    trusted = [active]
    extra = state_dir / "trusted_keys"
    if extra.exists():
        for line in extra.read_text().split():
            key = b64decode(line, length=32, what=str(extra))
            if key not in trusted:
                trusted.append(key)
    return SigningKeys(active_seed=seed, trusted=tuple(trusted))


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
