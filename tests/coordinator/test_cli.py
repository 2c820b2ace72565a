"""The real `coordinator serve` process on loopback, driven by the admin CLI as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.control import ControlClient, Enrollment, NodeKeys, PendingApproval
from tests.eventually import eventually

BIN = Path(sys.executable).parent / "coordinator"


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), "--state-dir", str(state), *args], capture_output=True, text=True, timeout=60
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(state: Path, port: int) -> subprocess.Popen[str]:
    return start_server_args(state, port)


def start_server_args(state: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            str(BIN),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state),
            "--stun-port",
            "0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"coordinator exited with status {proc.returncode}")
        return (state / "admin.sock").exists() and cli(state, "users", "list", "--json").returncode == 0

    try:
        eventually(answers, within=30, interval=0.1, what="the coordinator answers on its admin socket")
    except AssertionError as e:
        proc.kill()
        raise AssertionError(f"coordinator did not start ({e}): {proc.communicate()[1][-2000:]}") from None
    return proc


def stop_server(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    state, port = tmp_path / "state", free_port()
    proc = start_server(state, port)
    try:
        yield state, port
    finally:
        stop_server(proc)


def test_admin_cli_end_to_end(server: tuple[Path, int]) -> None:
    state, port = server
    assert oct((state / "admin.sock").stat().st_mode & 0o777) == "0o600"
    assert oct((state / "signing_key").stat().st_mode & 0o777) == "0o600"
    assert cli(state, "users", "create", "alice").returncode == 0
    users = json.loads(cli(state, "users", "list", "--json").stdout)
    assert [u["name"] for u in users] == ["alice"]
    assert "alice" in cli(state, "users", "list").stdout
    made = cli(state, "keys", "create", "--user", "alice", "--reusable", "--expiration", "2h", "--tag", "web")
    assert made.returncode == 0, made.stderr
    key = made.stdout.split()[-1]
    assert key.startswith("meshkey-")

    async def enroll() -> tuple[int, str]:
        async with ControlClient(f"http://127.0.0.1:{port}", NodeKeys.generate()) as c:
            e = await c.register("box1", auth_key=key)
            assert isinstance(e, Enrollment)
            waiting = ControlClient(f"http://127.0.0.1:{port}", NodeKeys.generate())
            pending = await waiting.register("box2")
            assert isinstance(pending, PendingApproval)
            await waiting.aclose()
            return e.node_id, pending.code

    _, code = asyncio.run(enroll())
    approved = cli(state, "nodes", "approve", code)
    assert approved.returncode == 0 and "box2" in approved.stdout, approved.stderr
    nodes = json.loads(cli(state, "nodes", "list", "--json").stdout)
    assert sorted(n["name"] for n in nodes) == ["box1", "box2"]
    assert next(n for n in nodes if n["name"] == "box1")["tags"] == ["web"]
    assert cli(state, "nodes", "rename", "box1", "alpha").returncode == 0
    assert cli(state, "nodes", "tag", "alpha", "db", "tag:prod").returncode == 0
    assert cli(state, "nodes", "expire", "box2").returncode == 0
    listing = cli(state, "nodes", "list")
    assert "alpha" in listing.stdout and "expired" in listing.stdout
    assert cli(state, "nodes", "remove", "box2").returncode == 0
    released = cli(state, "nodes", "remove", "box2", "--release")  # ends the name's quarantine
    assert released.returncode == 0 and "free for new nodes" in released.stdout, released.stderr
    gone = cli(state, "nodes", "remove", "box2", "--release")
    assert gone.returncode == 1 and gone.stderr.strip() == "error: unknown node 'box2'", gone.stderr
    assert cli(state, "policy", "get").stdout.strip() == "no policy set: everything is allowed"
    policy = state.parent / "policy.txt"
    policy.write_text('# everyone may reach everyone\n[[rules]]\nsrc = ["*"]\ndst = ["*:*"]\n')
    assert cli(state, "policy", "set", str(policy)).returncode == 0
    assert cli(state, "policy", "get").stdout == policy.read_text()
    audit = json.loads(cli(state, "audit", "list", "--json").stdout)
    assert {"node.approved", "node.renamed", "node.removed", "policy.changed"} <= {r["action"] for r in audit}
    verified = cli(state, "audit", "verify")
    assert verified.returncode == 0 and "chain intact" in verified.stdout
    assert key not in json.dumps(audit)


@pytest.fixture(scope="module")
def server_with_bob(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One server for all the error cases (they change nothing), with a user bob."""
    state = tmp_path_factory.mktemp("errors") / "state"
    proc = start_server(state, free_port())
    try:
        assert cli(state, "users", "create", "bob").returncode == 0
        yield state
    finally:
        stop_server(proc)


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str, status: int) -> None:
    assert result.returncode == status, result
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == "", "nothing on stdout when the command failed"


@pytest.mark.parametrize(
    ("running", "args", "message", "status"),
    [
        pytest.param(True, ("users", "create", "bob"), "already exists", 1, id="user-exists"),
        pytest.param(True, ("keys", "create", "--user", "nobody"), "unknown user", 1, id="unknown-user"),
        pytest.param(
            True,
            ("keys", "create", "--user", "bob", "--expiration", "soon"),
            "bad duration",
            1,
            id="bad-duration",
        ),
        pytest.param(
            True,
            ("users", "list", "--bogus"),
            "No such option: --bogus; see `coordinator users list --help`",
            2,
            id="unknown-option",
        ),
        pytest.param(True, ("nodes", "remove", "ghost"), "unknown node", 1, id="unknown-node"),
        pytest.param(
            True, ("nodes", "approve", "AAAA-BBBB"), "unknown enrollment code", 1, id="unknown-code"
        ),
        pytest.param(False, ("users", "list"), "coordinator is not running", 1, id="server-not-running"),
    ],
)
def test_cli_errors_are_one_line_and_non_zero(
    server_with_bob: Path, running: bool, args: tuple[str, ...], message: str, status: int
) -> None:
    state = server_with_bob if running else server_with_bob.parent / "nowhere"
    assert_one_line_error(cli(state, *args), message, status)


@pytest.mark.parametrize(
    ("args", "message", "status"),
    [
        pytest.param(
            ("status", "--bogus"),
            "No such option: --bogus; see `meshd status --help`",
            2,
            id="unknown-option",
        ),
        pytest.param(("ping",), "Missing argument 'peer'; see `meshd ping --help`", 2, id="missing-argument"),
        pytest.param(("status",), "meshd is not running", 1, id="not-running"),
        pytest.param(("up", "--wg-backend", "bogus"), "--wg-backend must be", 1, id="bad-value"),
    ],
)
def test_meshd_cli_fails_the_same_way(
    tmp_path: Path, args: tuple[str, ...], message: str, status: int
) -> None:
    """The two CLIs share one convention: one `error: ...` line on stderr, 2 for usage, 1 otherwise."""
    result = subprocess.run(
        [str(BIN.parent / "meshd"), *args, "--state-dir", str(tmp_path / "meshd")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(result, message, status)


def test_restart_keeps_state(tmp_path: Path) -> None:
    state, port = tmp_path / "state", free_port()
    proc = start_server(state, port)
    try:
        cli(state, "users", "create", "carol")
        key = cli(state, "keys", "create", "--user", "carol", "--reusable").stdout.split()[-1]

        async def enroll(name: str) -> Enrollment:
            async with ControlClient(f"http://127.0.0.1:{port}", NodeKeys.generate()) as c:
                e = await c.register(name, auth_key=key)
                assert isinstance(e, Enrollment)
                return e

        first = asyncio.run(enroll("one"))
        before = json.loads(cli(state, "nodes", "list", "--json").stdout)
    finally:
        stop_server(proc)
    assert not (state / "admin.sock").exists()
    proc = start_server(state, port)
    try:
        assert [u["name"] for u in json.loads(cli(state, "users", "list", "--json").stdout)] == ["carol"]
        after = json.loads(cli(state, "nodes", "list", "--json").stdout)
        assert [(n["name"], n["ips"]) for n in after] == [(n["name"], n["ips"]) for n in before]
        second = asyncio.run(enroll("two"))  # the reusable key survived the restart
        assert second.coordinator_public_key == first.coordinator_public_key
        assert set(second.ips).isdisjoint(first.ips)
        assert cli(state, "audit", "verify").returncode == 0
    finally:
        stop_server(proc)


def test_serve_with_a_bad_flag_fails_cleanly(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(BIN), "serve", "--listen", "nonsense", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert r.returncode != 0 and r.stderr.startswith("error: bad listen address"), r.stderr
