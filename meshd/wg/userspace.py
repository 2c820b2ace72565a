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
routes. `close()` stops it (SIGTERM, then SIGKILL after 3 s); the TUN link disappears with it.
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
        return await asyncio.wait_for(exchange(), within)
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
        self._supervisor: asyncio.Task[None] | None = None
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
        if await link.link_index(self._name) is not None:
            raise InterfaceInUse(
                f"interface {self._name} already exists; choose another --interface or delete it"
            )
        await self._start()
        await link.set_up(self._name)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"wireguard-go {self._name}")

    async def _start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._sock.unlink()  # stale: checked above that nobody answers on it
        env = {**os.environ, "LOG_LEVEL": os.environ.get("MESHD_WG_LOG_LEVEL", "error")}
        self._output.clear()
        self._proc = await asyncio.create_subprocess_exec(
            self._binary, "-f", self._name,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
        )  # fmt: skip
        proc = self._proc
        assert proc.stdout is not None
        reader = asyncio.create_task(self._drain(proc.stdout))
        deadline = time.monotonic() + START_TIMEOUT
        while not await socket_answers(self._sock):
            if proc.returncode is not None or time.monotonic() > deadline:
                await self._kill(proc)
                await asyncio.wait([reader], timeout=1.0)
                said = " / ".join(self._output) or "no output"
                raise WgError(f"wireguard-go did not start for {self._name}: {said}")
            await asyncio.sleep(0.02)
        log.info("%s: wireguard-go running (pid %d)", self._name, proc.pid)

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            text = raw.decode(errors="replace").rstrip()
            self._output.append(text)
            log.debug("%s: wireguard-go: %s", self._name, text)

    async def _supervise(self) -> None:
        failures = 0
        while not self._closing:
            proc = self._proc
            assert proc is not None
            await proc.wait()
            if self._closing:
                return
            log.warning("%s: wireguard-go exited (status %s); restarting", self._name, proc.returncode)
            while not self._closing:
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))
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
        self._closing = True
        if self._proc is not None:
            await self._kill(self._proc)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 3.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
