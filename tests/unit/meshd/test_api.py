"""The local control socket: a real server on a temporary unix socket and the CLI's client."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.api import MAX_REQUEST, ApiError, ControlServer, call


@pytest.fixture
def sock_path() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="meshd-api-")  # short: AF_UNIX paths are limited to 107 bytes
    try:
        yield Path(d) / "meshd.sock"
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def status(args: dict[str, Any]) -> Any:
    return {"self": {"name": "a"}, "peers": []}


async def ping(args: dict[str, Any]) -> Any:
    peer = args.get("peer")
    if peer != "b":
        raise ApiError(f"no peer named {peer}")
    return {"peer": "b", "path": "direct", "rtt_ms": 1.5}


async def crash(args: dict[str, Any]) -> Any:
    raise RuntimeError("secret detail")


async def slow(args: dict[str, Any]) -> Any:
    """A handler that never finishes (the timeouts under test must end it, not the handler)."""
    await asyncio.Event().wait()


HANDLERS = {"status": status, "ping": ping, "crash": crash, "slow": slow}


async def client(path: Path, command: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
    return await asyncio.to_thread(call, path, command, args, **kw)


async def test_commands_and_results(sock_path: Path) -> None:
    async with ControlServer(sock_path, HANDLERS):
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        assert await client(sock_path, "status") == {"self": {"name": "a"}, "peers": []}
        assert (await client(sock_path, "ping", {"peer": "b"}))["path"] == "direct"
        with pytest.raises(ApiError, match=r"^no peer named zz$"):
            await client(sock_path, "ping", {"peer": "zz"})
    assert not await asyncio.to_thread(sock_path.exists)


async def test_handler_crash_is_a_one_line_error_and_server_lives_on(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with ControlServer(sock_path, HANDLERS):
        with pytest.raises(ApiError) as err:
            await client(sock_path, "crash")
        assert str(err.value) == "internal error in meshd while running crash (RuntimeError); see its log"
        assert "secret detail" not in str(err.value)
        assert "secret detail" in caplog.text  # the traceback goes to the daemon's log
        assert await client(sock_path, "status")


async def test_unknown_command_lists_known_ones(sock_path: Path) -> None:
    async with ControlServer(sock_path, HANDLERS):
        with pytest.raises(ApiError, match=r"unknown command 'fly' \(this meshd knows: crash, ping, slow"):
            await client(sock_path, "fly")


async def test_handler_timeout(sock_path: Path) -> None:
    async with ControlServer(sock_path, HANDLERS, timeout=0.2):
        with pytest.raises(ApiError, match=r"slow did not finish within 0\.2 s"):
            await client(sock_path, "slow")


async def test_client_timeout(sock_path: Path) -> None:
    async with ControlServer(sock_path, HANDLERS):
        with pytest.raises(ApiError, match=r"meshd did not answer slow within 0\.3 s"):
            await client(sock_path, "slow", timeout=0.3)


def _raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\xff\xfe\n", "not one line of JSON"),
        (b"[1,2]\n", "request must be"),
        (b'{"command": "status", "args": 3}\n', "args must be an object"),
        (b"x" * (MAX_REQUEST + 10) + b"\n", "request longer than"),
        (b"", "not one line of JSON"),
    ],
)
async def test_malformed_requests_get_error_replies(sock_path: Path, data: bytes, error: str) -> None:
    async with ControlServer(sock_path, HANDLERS):
        reply = await asyncio.to_thread(_raw, sock_path, data)
        assert reply.startswith(b'{"ok":false,"error":"') and error.encode() in reply
        assert reply.count(b"\n") == 1
        assert await client(sock_path, "status")


async def test_not_running_says_how_to_start(sock_path: Path) -> None:
    not_running = r"^meshd is not running \(no socket at .*\); start it with `meshd up`$"
    with pytest.raises(ApiError, match=not_running):
        await client(sock_path, "status")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # a socket file nobody listens on, as after a crash
    with pytest.raises(ApiError, match=r"meshd is not running \(stale socket at"):
        await client(sock_path, "status")
    async with ControlServer(sock_path, HANDLERS):  # the stale file is replaced
        assert await client(sock_path, "status")


async def test_second_daemon_on_the_same_socket_is_refused(sock_path: Path) -> None:
    async with ControlServer(sock_path, HANDLERS):
        with pytest.raises(ApiError, match="meshd is already running"):
            await ControlServer(sock_path, HANDLERS).start()
        assert await client(sock_path, "status")  # the first one is untouched


async def test_refuses_to_replace_a_regular_file(sock_path: Path) -> None:
    await asyncio.to_thread(sock_path.write_text, "precious")
    with pytest.raises(ApiError, match="not a socket; move it away"):
        await ControlServer(sock_path, HANDLERS).start()
    assert await asyncio.to_thread(sock_path.read_text) == "precious"


async def test_register_after_construction(sock_path: Path) -> None:
    server = ControlServer(sock_path)

    async def down(args: dict[str, Any]) -> Any:
        return {"stopping": True}

    server.register("down", down)
    await server.start()
    try:
        assert await client(sock_path, "down") == {"stopping": True}
    finally:
        await server.close()
