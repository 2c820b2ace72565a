"""Userspace backend: a supervised `wireguard-go -f IFNAME`, configured over its UAPI unix socket.

The UAPI text protocol (https://www.wireguard.com/xplatform/) is spoken directly on
``/var/run/wireguard/IFNAME.sock`` (never through `wg`); the codec is meshd.wg.uapi. Addresses, MTU,
up/down and routes go through rtnetlink like the kernel backend (meshd.wg.link).

Name collision rule: /var/run/wireguard is one directory shared by every network namespace, so an
interface name is global across namespaces for wireguard-go. `create()` refuses to start (InterfaceInUse,
"choose another --interface") when IFNAME.sock exists and answers a ``get=1``; a socket file nobody answers
on is stale and removed. It also refuses when a link IFNAME already exists in this namespace.

Supervision: wireguard-go runs as our child with PR_SET_PDEATHSIG (it dies with the daemon). If it exits
while we did not ask it to, it is restarted (back-off 0.2 s doubling to 5 s, at most 5 attempts in a row)
and the last applied config is re-applied, so the interface comes back with its keys, peers, addresses and
routes. The watcher runs under meshd.supervise (an unexpected error is logged and the watch restarts).

Stopping: a process-group SIGTERM (``systemctl stop``) reaches wireguard-go and meshd at the same moment;
wireguard-go then exits by itself while meshd is still tearing down, and must NOT be restarted. So the
daemon calls :meth:`UserspaceBackend.begin_close` synchronously from its stop path (from then on nothing
is restarted; the tunnel itself keeps running until `close()`), and a wireguard-go that exited with status 0
(it was told to stop, it did not crash) is restarted only after a grace of ``STOPPED_GRACE`` s, in which a
daemon that is stopping has called `begin_close()`. `close()` is bounded (about 2 s; cut short by the
caller, it SIGKILLs): it stops the process (SIGTERM, SIGKILL after ``KILL_AFTER`` s) and then makes sure the
TUN link and the UAPI socket are gone, also when wireguard-go was killed outright and could not remove them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
from collections import deque
from pathlib import Path

from meshd.supervise import supervise
from meshd.wg import link, uapi
from meshd.wg.base import ReconcilingBackend
from meshd.wg.diff import DeviceOp
from meshd.wg.errors import BackendUnavailable, InterfaceInUse, UapiError, WgError
from meshd.wg.model import InterfaceState, check_ifname

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/wireguard")
UAPI_TIMEOUT = 5.0  #: seconds for one UAPI request/reply
START_TIMEOUT = 5.0  #: seconds for wireguard-go to create its socket
MAX_RESTARTS = 5
KILL_AFTER = 1.0  #: seconds between SIGTERM and SIGKILL when stopping wireguard-go (it needs milliseconds)
STOPPED_GRACE = 1.0  #: first restart delay after a clean exit (status 0: it was told to stop)


def socket_path(ifname: str) -> Path:
    return SOCKET_DIR / f"{ifname}.sock"


async def uapi_request(path: Path, request: bytes, within: float = UAPI_TIMEOUT) -> bytes:
    """Send one UAPI request on a fresh connection and return the whole reply (until the empty line)."""

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(request)
            await writer.drain()
            buf = b""
            while not uapi.reply_complete(buf):
                chunk = await reader.read(65536)
                if not chunk:
                    raise UapiError(f"wireguard-go closed {path} before finishing its reply")
                buf += chunk
                if len(buf) > uapi.MAX_REPLY:
                    raise UapiError(f"UAPI reply from {path} exceeds {uapi.MAX_REPLY} bytes")
            return buf
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        async with asyncio.timeout(within):  # not wait_for: on 3.11 it can swallow a cancellation
            return await exchange()
    except TimeoutError:
        raise UapiError(f"no UAPI reply from {path} within {within:g} s") from None
    except OSError as e:
        raise UapiError(f"cannot talk to wireguard-go on {path}: {e.strerror or e}") from None


async def socket_answers(path: Path) -> bool:
    """True when something answers a UAPI ``get=1`` on `path` (whatever namespace it runs in)."""
    try:
        uapi.decode_get(await uapi_request(path, uapi.encode_get(), within=1.0), "probe")
    except UapiError:
        return False
    return True


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class UserspaceBackend(ReconcilingBackend):
    """WireGuard through a supervised wireguard-go process (see the module docstring for the rules)."""

    kind = "userspace"

    def __init__(self, name: str, binary: str = "wireguard-go") -> None:
        super().__init__(check_ifname(name))
        self._binary = binary
        self._sock = socket_path(name)
        self._proc: asyncio.subprocess.Process | None = None
        self._started = False  #: we ran a wireguard-go for this name (so its link and socket are ours)
        self._supervisor: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._output: deque[str] = deque(maxlen=20)
        self._closing = False
        self._failed: str | None = None
        self.restarts = 0  #: how many times wireguard-go was restarted after dying

    @property
    def pid(self) -> int | None:
        """Process id of the running wireguard-go, if any."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def create(self) -> None:
        if shutil.which(self._binary) is None:
            raise BackendUnavailable(f"{self._binary} is not installed; apt-get install wireguard-go")
        if await socket_answers(self._sock):
            raise InterfaceInUse(
                f"interface name {self._name} is in use by another wireguard-go ({self._sock} answers; "
                "that directory is shared by all network namespaces): choose another --interface"
            )
        if link.exists(self._name):
            raise InterfaceInUse(
                f"interface {self._name} already exists; choose another --interface or delete it"
            )
        if self._closing:
            raise WgError(f"interface {self._name} was closed")
        try:
            await self._start()
            await link.set_up(self._name)
        except BaseException:
            await asyncio.shield(self.close())  # nothing half-made stays behind (also when cancelled)
            raise
        self._supervisor = asyncio.create_task(
            supervise(f"wireguard-go {self._name}", self._watch), name=f"wireguard-go {self._name}"
        )

    async def _start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._sock.unlink()  # stale: checked above that nobody answers on it
        env = {**os.environ, "LOG_LEVEL": os.environ.get("MESHD_WG_LOG_LEVEL", "error")}
        self._output.clear()
        self._started = True
        self._proc = proc = await asyncio.create_subprocess_exec(
            self._binary, "-f", self._name,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
        )  # fmt: skip
        assert proc.stdout is not None
        self._reader = reader = asyncio.create_task(self._drain(proc.stdout))  # referenced: never GC'd
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not await socket_answers(self._sock):
                if proc.returncode is not None or time.monotonic() > deadline or self._closing:
                    await self._kill(proc)
                    await asyncio.wait([reader], timeout=1.0)
                    said = " / ".join(self._output) or "no output"
                    raise WgError(f"wireguard-go did not start for {self._name}: {said}")
                await asyncio.sleep(0.005)  # the socket comes ~10-30 ms after exec; each ms counts (issue 15)
        except asyncio.CancelledError:
            # cancelled half-way (the daemon stops): no await here, the process must not outlive this
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        log.info("%s: wireguard-go running (pid %d)", self._name, proc.pid)

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            text = raw.decode(errors="replace").rstrip()
            self._output.append(text)
            log.debug("%s: wireguard-go: %s", self._name, text)

    def begin_close(self) -> None:
        """From now on wireguard-go is never restarted (synchronous, idempotent; `close()` does it too).

        The daemon calls this first thing when it is told to stop, before any slow tear-down step: the
        SIGTERM of a process-group stop has also reached wireguard-go, and restarting it then would only
        bring up an interface that the tear-down must remove again. The running tunnel is not touched.
        """
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()

    async def _watch(self) -> None:
        """Wait for wireguard-go to exit; restart it and re-apply the config, unless we are closing."""
        failures = 0
        while not self._closing:
            proc = self._proc
            assert proc is not None
            await proc.wait()
            if self._closing:
                return
            clean = proc.returncode == 0  # SIGTERM/SIGINT or its link deleted: told to stop, not a crash
            first = STOPPED_GRACE if clean else 0.2
            log.warning(
                "%s: wireguard-go exited (status %s); restarting in %.1f s",
                self._name, proc.returncode, first,
            )  # fmt: skip
            while True:
                delay = min(0.2 * 2**failures, 5.0)
                await asyncio.sleep(first if failures == 0 else delay)
                if self._closing:
                    log.info("%s: not restarting wireguard-go: closing", self._name)
                    return
                try:
                    await self._start()
                    await link.set_up(self._name)
                    if self._desired is not None:
                        await super().apply(self._desired)
                except WgError as e:
                    failures += 1
                    log.error("%s: restarting wireguard-go failed: %s", self._name, e)
                    if failures >= MAX_RESTARTS:
                        self._failed = f"wireguard-go for {self._name} died and {failures} restarts failed"
                        log.error("%s", self._failed)
                        return
                    continue
                failures = 0
                self.restarts += 1
                break

    async def _read(self) -> InterfaceState:
        self._check_alive()
        return uapi.decode_get(await uapi_request(self._sock, uapi.encode_get()), self._name)

    async def _write(self, ops: list[DeviceOp]) -> None:
        self._check_alive()
        uapi.decode_set(await uapi_request(self._sock, uapi.encode_set(ops)))

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise WgError(self._failed)
        if self._proc is None or self._closing:
            raise WgError(f"interface {self._name} is not running (create() was not called or it was closed)")

    async def close(self) -> None:
        """Stop wireguard-go; its link and socket are gone when this returns. Bounded (~KILL_AFTER + 0.5 s),
        and a caller's deadline is fine too: cancelled half-way, it SIGKILLs wireguard-go on the way out."""
        self.begin_close()
        supervisor, self._supervisor = self._supervisor, None
        try:
            if supervisor is not None:
                # asyncio.wait, not `await task`: a CancelledError of *ours* must propagate, not be swallowed
                await asyncio.wait([supervisor], timeout=0.2)
            if self._proc is not None:
                await self._kill(self._proc)
        except asyncio.CancelledError:
            if self._proc is not None and self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()  # the TUN goes with the process; the socket file is removed below
            self._remove_socket()
            raise
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._remove_socket()
        if not self._started:
            return
        try:
            async with asyncio.timeout(0.5):
                if await link.link_index(self._name) is not None:
                    await link.delete_link(self._name)
        except (WgError, OSError, TimeoutError) as e:
            log.warning("%s: removing the link: %s", self._name, e)

    def _remove_socket(self) -> None:
        """wireguard-go removes its socket when it stops cleanly; after a SIGKILL (ours or anyone's) it
        cannot. Only ours: when create() refused the name, socket and link are somebody else's."""
        if self._started:
            with contextlib.suppress(FileNotFoundError):
                self._sock.unlink()

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(KILL_AFTER):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await proc.wait()
