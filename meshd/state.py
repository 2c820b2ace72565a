"""meshd's state directory (default /var/lib/meshd): local keys and what enrollment returned.

Layout (directory 0700, files 0600, owned by the daemon's user)::

    state.json   {"version": 1, "wireguard_private_key": b64, "node_private_key": b64,
                  "coordinator_url": str | null, "enrollment": {...} | null,
                  "pending_wireguard_private_key": b64 (optional: a rotation in flight)}
    meshd.sock   the local control socket (meshd.api)
    lock         flock()ed by the running daemon (one daemon per state dir)

The WireGuard key (X25519) and the node key (Ed25519 seed) are generated here on first start and never
leave the host (DESIGN.md §1 "Identity"). The file is replaced atomically (temporary file, fsync,
rename, fsync of the directory), so a crash leaves the old or the new state, never half of one.
Anything wrong with it (unreadable, corrupt, too open, someone else's) is a :class:`StateError` with a
one-line message saying what to do.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from meshd.control import Enrollment, NodeKeys
from meshd.proto.encoding import b64decode, b64encode

DEFAULT_STATE_DIR = Path("/var/lib/meshd")
STATE_FILE = "state.json"
SOCKET_FILE = "meshd.sock"
LOCK_FILE = "lock"
VERSION = 1


class StateError(Exception):
    """The state directory or file is unusable; the message says what to do."""


@dataclass(frozen=True, slots=True)
class NodeState:
    """Everything meshd keeps across restarts."""

    keys: NodeKeys
    coordinator_url: str | None = None
    enrollment: Enrollment | None = None
    #: a new WireGuard key saved before the coordinator is asked to take it (meshd.credentials
    #: ``rotate_keys``): after a crash either key may be the one the coordinator has, and both are here
    pending_wg_private: bytes | None = field(default=None, repr=False)

    @property
    def enrolled(self) -> bool:
        return self.enrollment is not None

    def with_enrollment(self, coordinator_url: str, enrollment: Enrollment) -> NodeState:
        return replace(self, coordinator_url=coordinator_url, enrollment=enrollment)

    def with_cert(self, cert: str) -> NodeState:
        """The renewed node certificate (opaque here; meshd.proto.cert reads it)."""
        if self.enrollment is None:
            raise StateError("cannot store a certificate before enrollment")
        return replace(self, enrollment=replace(self.enrollment, cert=cert))

    def with_wireguard_key(self, wg_private: bytes) -> NodeState:
        """After `meshd rotate-keys`: the new WireGuard private key (the node key stays); nothing pending."""
        return replace(self, keys=replace(self.keys, wg_private=wg_private), pending_wg_private=None)

    def with_pending_wireguard_key(self, wg_private: bytes | None) -> NodeState:
        """A rotation's new key before the coordinator took it (None: the rotation is settled)."""
        return replace(self, pending_wg_private=wg_private)


# --- codec ---------------------------------------------------------------------------------------------


def encode_state(state: NodeState) -> bytes:
    """The state file's bytes (pretty JSON, trailing newline)."""
    e = state.enrollment
    doc: dict[str, Any] = {
        "version": VERSION,
        "wireguard_private_key": b64encode(state.keys.wg_private),
        "node_private_key": b64encode(state.keys.node_private),
        "coordinator_url": state.coordinator_url,
        "enrollment": None
        if e is None
        else {
            "node_id": e.node_id,
            "name": e.name,
            "ips": list(e.ips),
            "cert": e.cert,
            "coordinator_public_key": b64encode(e.coordinator_public_key),
            "trusted_keys": [b64encode(k) for k in e.trusted_keys],
            "domain": e.domain,
            "ipv4_prefix": e.ipv4_prefix,
            "ipv6_prefix": e.ipv6_prefix,
        },
    }
    if state.pending_wg_private is not None:  # absent otherwise: files without it are the common case
        doc["pending_wireguard_private_key"] = b64encode(state.pending_wg_private)
    return (json.dumps(doc, indent=2) + "\n").encode()


def _get(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}{key} missing")
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{where}{key} has the wrong type")
    return value


def _strs(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return tuple(value)


def decode_state(data: bytes) -> NodeState:
    """Parse a state file; ValueError says what is wrong with it."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if doc.get("version") != VERSION:
        raise ValueError(f"unknown version {doc.get('version')!r} (this meshd reads {VERSION})")
    keys = NodeKeys(
        wg_private=b64decode(_get(doc, "wireguard_private_key", str, ""), length=32, what="wireguard key"),
        node_private=b64decode(_get(doc, "node_private_key", str, ""), length=32, what="node key"),
    )
    pending = doc.get("pending_wireguard_private_key")  # optional: older files do not have it
    if pending is not None:
        if not isinstance(pending, str):
            raise ValueError("pending_wireguard_private_key has the wrong type")
        pending = b64decode(pending, length=32, what="pending wireguard key")
    url = doc.get("coordinator_url")
    if url is not None and not isinstance(url, str):
        raise ValueError("coordinator_url has the wrong type")
    raw = doc.get("enrollment")
    enrollment = None
    if raw is not None:
        if not isinstance(raw, dict):
            raise ValueError("enrollment is not an object")
        w = "enrollment."
        enrollment = Enrollment(
            node_id=_get(raw, "node_id", int, w),
            name=_get(raw, "name", str, w),
            ips=_strs(_get(raw, "ips", list, w), "enrollment.ips"),
            cert=_get(raw, "cert", str, w),
            coordinator_public_key=b64decode(
                _get(raw, "coordinator_public_key", str, w), length=32, what="coordinator key"
            ),
            trusted_keys=tuple(
                b64decode(k, length=32, what="trusted key")
                for k in _strs(_get(raw, "trusted_keys", list, w), "enrollment.trusted_keys")
            ),
            domain=_get(raw, "domain", str, w),
            ipv4_prefix=_get(raw, "ipv4_prefix", str, w),
            ipv6_prefix=_get(raw, "ipv6_prefix", str, w),
        )
        if url is None:
            raise ValueError("enrolled but coordinator_url is missing")
    return NodeState(keys=keys, coordinator_url=url, enrollment=enrollment, pending_wg_private=pending)


# --- the directory -------------------------------------------------------------------------------------


class StateLock:
    """The held lock on a state dir; ``close()`` (or process exit) releases it."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StateDir:
    """The state directory. Nothing touches the disk until a method is called."""

    def __init__(self, path: Path | str = DEFAULT_STATE_DIR) -> None:
        self.path = Path(path)

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def socket_path(self) -> Path:
        return self.path / SOCKET_FILE

    def ensure(self) -> None:
        """Create the directory (0700) if needed and check that only we can use it."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self.path.stat()
        except OSError as exc:
            raise StateError(f"cannot create state dir {self.path}: {exc.strerror}") from None
        self._check_private(st, self.path, "state dir", "700")

    def lock(self) -> StateLock:
        """Take the state dir for this process (released on close/exit); StateError if another has it."""
        self.ensure()
        path = self.path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(
                f"another meshd is using {self.path}; stop it first (`meshd down`) or use another --state-dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StateError(f"cannot lock {path}: {exc.strerror}") from None
        return StateLock(fd)

    def load(self) -> NodeState | None:
        """The saved state, or None when there is none yet."""
        try:
            fd = os.open(self.state_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read state file {self.state_file}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StateError(f"state file {self.state_file} is not a regular file; move it away")
            self._check_private(st, self.state_file, "state file", "600")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(1 << 20)
        finally:
            os.close(fd)
        try:
            return decode_state(data)
        except ValueError as exc:
            raise StateError(
                f"state file {self.state_file} is corrupt ({exc}); move it away to re-enroll"
            ) from None

    def load_or_create(self) -> NodeState:
        """The saved state; on first start, fresh keys generated here and saved."""
        self.ensure()
        state = self.load()
        if state is None:
            state = NodeState(keys=NodeKeys.generate())
            self.save(state)
        return state

    def save(self, state: NodeState) -> None:
        """Replace the state file atomically (0600)."""
        self.ensure()
        tmp = self.path / f".{STATE_FILE}.{os.getpid()}.tmp"
        data = encode_state(state)
        try:
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.state_file)
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StateError(f"cannot write state file {self.state_file}: {exc.strerror}") from None

    @staticmethod
    def _check_private(st: os.stat_result, path: Path, what: str, mode: str) -> None:
        if st.st_uid != os.geteuid():
            raise StateError(
                f"{what} {path} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()}); "
                f"run meshd as its owner or use another --state-dir"
            )
        if st.st_mode & 0o077:
            raise StateError(
                f"{what} {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run `chmod {mode} {path}` (and `meshd rotate-keys` if others could read the keys)"
            )
