"""The admin CLI driving a remote coordinator over HTTPS: `--url`, `--token-file`, `--ca-cert`."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from meshd.control import ControlClient, Enrollment, NodeKeys, PendingApproval
from tests.coordinator.test_cli import BIN, cli, free_port, start_server_args, stop_server
from tests.coordinator.test_completion import bash_tab, install_bash_completion

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs openssl for a test certificate"
)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "coord.pem", tmp_path / "coord.key"
    subject = ["-subj", "/CN=coord", "-addext", "subjectAltName=IP:127.0.0.1"]
    args = ["-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"]
    subprocess.run(
        ["openssl", "req", *args, "-keyout", str(key), "-out", str(cert), *subject],
        check=True,
        capture_output=True,
    )
    return cert, key


def remote(url: str, token_file: Path, ca: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    extra = ["--ca-cert", str(ca)] if ca else []
    return subprocess.run(
        [str(BIN), "--url", url, "--token-file", str(token_file), *extra, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_remote_cli_over_https_with_scoped_tokens(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    state, port = tmp_path / "state", free_port()
    url = f"https://127.0.0.1:{port}"
    proc = start_server_args(state, port, "--tls-cert", str(cert), "--tls-key", str(key))
    secrets: list[str] = []
    audit = ""
    try:
        files = {}
        for scope in ("read", "nodes", "admin"):
            made = cli(state, "tokens", "create", "--scope", scope, "--expiration", "1d")
            assert made.returncode == 0, made.stderr
            secrets.append(made.stdout.split()[-1])
            files[scope] = tmp_path / f"{scope}.token"
            files[scope].write_text(secrets[-1] + "\n")
        cli(state, "users", "create", "alice")
        authkey = cli(state, "keys", "create", "--user", "alice").stdout.split()[-1]

        async def enroll() -> None:
            async with ControlClient(url, NodeKeys.generate(), verify=str(cert)) as c:
                assert isinstance(await c.register("db1", auth_key=authkey), Enrollment)

        async def wait() -> str:
            async with ControlClient(url, NodeKeys.generate(), verify=str(cert)) as c:
                pending = await c.register("desk")
                assert isinstance(pending, PendingApproval)
                return pending.code

        asyncio.run(enroll())
        code = asyncio.run(wait())

        listed = remote(url, files["read"], cert, "nodes", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [n["name"] for n in json.loads(listed.stdout)] == ["db1"]

        # pending approvals are listed remotely too (a read token may list them, not approve them)
        waiting = remote(url, files["read"], cert, "nodes", "pending", "--json")
        assert waiting.returncode == 0, waiting.stderr
        assert [(w["code"], w["hostname"]) for w in json.loads(waiting.stdout)] == [(code, "desk")]
        table = remote(url, files["read"], cert, "nodes", "pending")
        assert code in table.stdout and "desk" in table.stdout
        assert remote(url, files["read"], cert, "nodes", "approve", code).returncode == 1

        # TAB in a real bash with the installed script completes node names from the remote coordinator,
        # through --url / --token-file / --ca-cert as typed on the command line
        script = install_bash_completion(tmp_path / "home")
        typed = ["coordinator", "--url", url, "--token-file", str(files["read"]), "--ca-cert", str(cert)]
        assert bash_tab(script, [*typed, "nodes", "remove", "d"]) == ["db1"]
        assert bash_tab(script, [*typed, "keys", "create", "--user", "a"]) == ["alice"]
        assert (
            bash_tab(script, [*typed[:3], "--token-file", str(tmp_path / "none"), "nodes", "remove", ""])
            == []
        )

        # a read token cannot remove a node; a nodes token can
        refused = remote(url, files["read"], cert, "nodes", "remove", "db1")
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            "error: token 1 has scope 'read', which does not allow DELETE /admin/nodes/{name}"
        )
        assert remote(url, files["nodes"], cert, "nodes", "remove", "db1").returncode == 0
        assert json.loads(cli(state, "nodes", "list", "--json").stdout) == []

        # every admin command works remotely, token management too (with an admin token)
        made = remote(url, files["admin"], cert, "tokens", "create", "--scope", "audit")
        assert made.returncode == 0 and made.stdout.split()[-1].startswith("meshtok-"), made.stderr
        secrets.append(made.stdout.split()[-1])
        tokens = json.loads(remote(url, files["admin"], cert, "tokens", "list", "--json").stdout)
        assert [t["scope"] for t in tokens] == ["read", "nodes", "admin", "audit"]
        assert remote(url, files["admin"], cert, "tokens", "revoke", "1").returncode == 0
        gone = remote(url, files["read"], cert, "nodes", "list")
        assert gone.returncode == 1 and "refused the token" in gone.stderr

        # the user's mistakes: one line each, exit 1
        untrusted = remote(url, files["admin"], None, "nodes", "list")
        assert untrusted.returncode == 1 and "--ca-cert" in untrusted.stderr
        (tmp_path / "junk").write_text("hunter2\n")
        junk = remote(url, tmp_path / "junk", cert, "nodes", "list")
        assert junk.returncode == 1 and "does not hold an admin token" in junk.stderr
        no_file = subprocess.run([str(BIN), "--url", url, "nodes", "list"], capture_output=True, text=True)
        assert no_file.returncode == 1 and "--url needs --token-file" in no_file.stderr
        for r in (refused, gone, untrusted, junk, no_file):
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        audit = cli(state, "audit", "list", "--json").stdout
        assert '"actor": "token:2"' in audit  # the nodes token's use is on record
    finally:
        err = stop_server(proc)
    for secret in secrets:
        assert secret not in err and secret not in audit
