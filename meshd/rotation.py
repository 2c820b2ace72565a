"""WireGuard key rotation helpers: the rotation interval option and the key's age on disk.

The daemon's side (meshd/daemon.py ``Daemon.rotate_keys``): make a new X25519 key locally, register it
with the coordinator with proof of possession (``ControlClient.rotate_key``), save it, give it to
WireGuard at once (the coordinator publishes it to the peers within its coalescing delay, so the peers'
new WireGuard peer entry initiates a handshake to a node that already answers with the new key), and
reconnect the relay links under the new key.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

DEFAULT_INTERVAL = 30 * 86400.0
AGE_FILE = "wg_key_created"  #: unix seconds the current WireGuard key was made (written by meshd)
MIN_INTERVAL = 60.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_INTERVAL_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")


class IntervalError(ValueError):
    """A malformed rotation interval."""


def parse_interval(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600`` (seconds) or ``0`` (never) -> seconds."""
    m = _INTERVAL_RE.match(text.strip().lower())
    if m is None:
        raise IntervalError(f"bad key rotation interval {text!r}: expected e.g. 30d, 12h, 90m or 0 (never)")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if 0 < seconds < MIN_INTERVAL:
        raise IntervalError(f"key rotation interval {text!r} is shorter than {int(MIN_INTERVAL)} s")
    return seconds


def key_created(state_dir: Path, now: float | None = None) -> float:
    """When the current WireGuard key was made; a missing or unreadable record starts the clock now."""
    path = state_dir / AGE_FILE
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        stamp = time.time() if now is None else now
        record_key_created(state_dir, stamp)
        return stamp


def record_key_created(state_dir: Path, when: float) -> None:
    """Write the record atomically (0600 like the rest of the state dir)."""
    path = state_dir / AGE_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{when:.0f}\n")
    os.replace(tmp, path)
