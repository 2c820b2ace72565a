"""The standalone-relay feed secret (``<state-dir>/relay.secret``): made, read and checked, failing closed.

The secret is the bearer credential of every standalone relay's feed. An empty or short file (a crash
between create and write leaves an empty one; an operator may paste a placeholder) must never become
the secret: both ``coordinator serve`` and ``coordinator relay serve`` refuse to start with one line
that says which file and what to do.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from coordinator.errors import CoordinatorError

#: Fewer bytes than this (after stripping the trailing newline and surrounding whitespace) is refused.
#: A made secret is 43 characters (32 random bytes, base64url).
MIN_SECRET = 16


class RelaySecretError(CoordinatorError):
    """The relay secret is missing, unreadable, empty or too short; the message says where and what to do."""


def check(value: str, source: str) -> str:
    """`value` stripped, if it is a usable secret (at least MIN_SECRET characters, no inner whitespace)."""
    text = value.strip()
    if len(text.encode()) < MIN_SECRET or any(c.isspace() for c in text):
        raise RelaySecretError(
            f"relay secret in {source} is empty, shorter than {MIN_SECRET} bytes or contains whitespace; "
            "delete it to have `coordinator serve` make a new one, then give the new file to the relays"
        )
    return text


def read(path: Path) -> str:
    """The checked secret from `path` (``relay serve --secret-file``)."""
    try:
        return check(path.read_text(), str(path))
    except OSError as exc:
        raise RelaySecretError(f"cannot read the relay secret {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise RelaySecretError(f"relay secret in {path} is not text") from None


def load_or_create(state_dir: Path) -> str:
    """The coordinator's secret: made 0600 on first use (written to a temporary file, fsynced, then
    linked into place, so a crash never leaves an empty ``relay.secret``), checked when it exists."""
    path = state_dir / "relay.secret"
    if path.exists():
        return read(path)
    value = secrets.token_urlsafe(32)
    tmp = state_dir / f".relay.secret.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a secret another process made meanwhile
        except FileExistsError:
            return read(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return value
