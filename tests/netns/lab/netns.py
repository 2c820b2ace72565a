"""One network namespace: create it, run commands in it, track its processes, delete it.

Names look like ``mlab-<owner>-<role>`` where ``<owner>`` is unique per :class:`~tests.netns.lab.Lab`
(``<pid>x<random>``). Each owner holds an ``flock`` on ``/run/meshlab/<owner>.lock`` for its lifetime, so a
later run can tell a namespace left behind by a killed run (lock free) from one still in use by another
engineer's run (lock held) and sweep only the former: see :func:`sweep_stale`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import IO

PREFIX = "mlab-"
NETNS_DIR = Path("/run/netns")
LOCK_DIR = Path("/run/meshlab")
STALE_AFTER = 120.0  #: seconds; a namespace younger than this is never swept

_OWNER_RE = re.compile(rf"^{re.escape(PREFIX)}(?P<owner>\d+x[0-9a-f]+)-")


class LabError(RuntimeError):
    """The lab could not be built or a command in it failed."""


def new_owner() -> str:
    """A fresh owner tag: the pid plus randomness (pids repeat across containers and time)."""
    return f"{os.getpid()}x{secrets.token_hex(2)}"


class OwnerLock:
    """The flock that marks an owner tag as alive; released by the kernel when the process dies."""

    def __init__(self, owner: str) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        self.path = LOCK_DIR / f"{owner}.lock"
        self._fd: int | None = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def owner_alive(owner: str) -> bool:
    """True if some live process holds the owner's lock."""
    path = LOCK_DIR / f"{owner}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of existing namespaces that start with ``prefix``."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def ns_pids(name: str) -> list[int]:
    """Pids of processes whose network namespace is ``name``."""
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    return [int(tok) for tok in out.stdout.split() if tok.isdigit()]


def kill_pids(pids: Sequence[int], grace: float = 1.0) -> None:
    """SIGTERM then, after ``grace`` seconds, SIGKILL the given pids."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as dead; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def delete_namespace(name: str) -> None:
    """Kill every process in the namespace, then delete it (its veths and bridges go with it)."""
    kill_pids(ns_pids(name))
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def sweep_stale(
    now: float | None = None, older_than: float = STALE_AFTER, owners: Collection[str] | None = None
) -> list[str]:
    """Delete this harness's namespaces whose owner is dead and that are older than ``older_than`` s
    (only those of ``owners`` if given). Returns the names deleted.

    Safe while other runs are active: a namespace whose owner still holds its lock is never touched.
    """
    now = time.time() if now is None else now
    swept: list[str] = []
    for name in list_namespaces():
        m = _OWNER_RE.match(name)
        if m is None or (owners is not None and m["owner"] not in owners):
            continue
        try:
            age = now - (NETNS_DIR / name).stat().st_mtime
        except FileNotFoundError:
            continue
        if age < older_than or owner_alive(m["owner"]):
            continue
        delete_namespace(name)
        swept.append(name)
    for lock in LOCK_DIR.glob("*.lock") if LOCK_DIR.is_dir() else []:
        owner = lock.name.removesuffix(".lock")
        if not owner_alive(owner) and not any(n.startswith(f"{PREFIX}{owner}-") for n in list_namespaces()):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    return swept


class Namespace:
    """A network namespace with ``lo`` up; every process started through it is killed on :meth:`delete`."""

    def __init__(self, name: str) -> None:
        if len(name) > 200 or "/" in name:
            raise LabError(f"bad namespace name {name!r}")
        self.name = name
        self._procs: list[subprocess.Popen[bytes]] = []
        self._deleted = False
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        try:
            self.sh("ip link set lo up")
        except BaseException:
            delete_namespace(name)
            raise

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """The argv that runs ``cmd`` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the namespace to completion; text output is captured."""
        try:
            res = subprocess.run(
                self.argv(cmd),
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                env=None if env is None else {**os.environ, **env},
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"[{self.name}] {' '.join(cmd)}: timed out after {timeout} s") from exc
        if check and res.returncode != 0:
            why = res.stderr.strip() or res.stdout.strip()
            raise LabError(f"[{self.name}] {' '.join(cmd)}: exit {res.returncode}: {why}")
        return res

    def sh(self, script: str, *, timeout: float = 30.0) -> str:
        """Run a ``sh -e`` script in the namespace; raise :class:`LabError` with its stderr on failure."""
        return self.run(["sh", "-ec", script], check=True, timeout=timeout).stdout

    def python(
        self, code: str, *args: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` (``python -c``) in the namespace with this interpreter; ``args`` go to argv."""
        return self.run([sys.executable, "-c", code, *args], check=check, timeout=timeout)

    def popen(
        self,
        cmd: Sequence[str],
        *,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = subprocess.DEVNULL,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in its own process group; it is killed by :meth:`delete`."""
        if self._deleted:
            raise LabError(f"namespace {self.name} is already deleted")
        proc = subprocess.Popen(
            self.argv(cmd),
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            env=None if env is None else {**os.environ, **env},
            cwd=cwd,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Processes started with :meth:`popen` (running or not)."""
        return list(self._procs)

    def stop_processes(self, grace: float = 1.0) -> None:
        """Stop every process group started here: SIGTERM, then SIGKILL after ``grace`` seconds."""
        running = [p for p in self._procs if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(2.0)

    def delete(self) -> None:
        """Stop processes, kill anything else left in the namespace, delete it. Idempotent."""
        if self._deleted:
            return
        self._deleted = True
        self.stop_processes()
        delete_namespace(self.name)
