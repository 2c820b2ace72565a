"""The daemon's local control socket ``<state-dir>/meshd.sock`` and the client the CLI uses.

Protocol: one request per connection, each direction one line of JSON (UTF-8, ``\\n``-terminated)::

    -> {"command": "ping", "args": {"peer": "b"}}
    <- {"ok": true, "result": {...}}          or   {"ok": false, "error": "no peer named b"}

Why not HTTP: the socket has one local client (the CLI), no routing, headers, caching or streaming to
speak of; a JSON line needs no parser beyond ``json`` and no framework in the daemon's event loop (an
ASGI server there would also bring its own signal handling, which the daemon must own). Access control
is the file mode: the socket is 0600 in the 0700 state directory, so only the daemon's user (root)
can talk to it.

Server side, the daemon registers one async handler per command (``status``, ``ping``, ``down``,
``netcheck``, ``rotate-keys``); a handler returns a JSON value or raises :class:`ApiError` with a
one-line message for the user. Client side, :func:`call` returns the parsed result or raises
:class:`ApiError` with a message that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

MAX_REQUEST = 64 * 1024
MAX_RESPONSE = 16 * 1024 * 1024


class ApiError(Exception):
    """A one-line, user-facing error of the control socket (server refusal or client failure)."""


class ControlServer:
    """The unix-socket server; use ``async with ControlServer(path, handlers):`` or start()/close()."""

    def __init__(
        self, path: Path | str, handlers: Mapping[str, Handler] | None = None, *, timeout: float = 60.0
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._handlers: dict[str, Handler] = dict(handlers or {})
        self._server: asyncio.Server | None = None
        self._inode: int | None = None

    def register(self, command: str, handler: Handler) -> None:
        self._handlers[command] = handler

    async def start(self) -> None:
        """Bind the socket (0600, replacing a stale one); ApiError if another meshd answers on it."""
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)  # before listen(): nobody can connect in between
            self._inode = os.stat(self.path).st_ino
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)
        except OSError as exc:
            sock.close()
            raise ApiError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None

    async def close(self) -> None:
        """Stop listening and remove the socket file (if it is still ours)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: 3.11's wait_for can swallow a cancel
                async with asyncio.timeout(self.timeout):
                    await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ApiError(f"cannot use {self.path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ApiError(f"{self.path} exists and is not a socket; move it away")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except OSError:
            os.unlink(self.path)  # nobody listens: left over from a crash
            return
        finally:
            probe.close()
        raise ApiError(f"meshd is already running (it answers on {self.path})")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._answer(reader)
            writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout):
                line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            return _error(f"request longer than {MAX_REQUEST} bytes")
        except TimeoutError:
            return _error("no request received")
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _error("request is not one line of JSON")
        if not isinstance(req, dict) or not isinstance(req.get("command"), str):
            return _error('request must be {"command": NAME, "args": {...}}')
        command, args = req["command"], req.get("args", {})
        if not isinstance(args, dict):
            return _error("args must be an object")
        handler = self._handlers.get(command)
        if handler is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            return _error(f"unknown command {command!r} (this meshd knows: {known})")
        try:
            async with asyncio.timeout(self.timeout):
                result = await handler(args)
            json.dumps(result)  # fail here, not half-way through the reply
        except ApiError as exc:
            return _error(str(exc))
        except TimeoutError:
            return _error(f"{command} did not finish within {self.timeout:g} s")
        except Exception as exc:
            log.exception("control command %s failed", command)
            name = type(exc).__name__
            return _error(f"internal error in meshd while running {command} ({name}); see its log")
        return {"ok": True, "result": result}


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def call(path: Path | str, command: str, args: dict[str, Any] | None = None, *, timeout: float = 10.0) -> Any:
    """Run ``command`` in the daemon listening on ``path``; the result, or ApiError saying what to do."""
    path = Path(path)
    request = json.dumps({"command": command, "args": args or {}}).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ApiError(f"meshd is not running (no socket at {path}); start it with `meshd up`") from None
        except ConnectionRefusedError:
            raise ApiError(
                f"meshd is not running (stale socket at {path}); start it with `meshd up`"
            ) from None
        except PermissionError:
            raise ApiError(f"permission denied on {path}; run this as root (meshd's user)") from None
        except OSError as exc:
            raise ApiError(f"cannot reach meshd at {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(request)
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_RESPONSE:
                    raise ApiError("meshd's answer is too large")
        except TimeoutError:
            raise ApiError(f"meshd did not answer {command} within {timeout:g} s") from None
        except OSError as exc:
            raise ApiError(f"lost the connection to meshd: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError("meshd closed the connection without a valid answer") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ApiError("meshd sent a malformed answer")
    if not reply["ok"]:
        raise ApiError(str(reply.get("error") or "meshd refused the command"))
    return reply.get("result")
