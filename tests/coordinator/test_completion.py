"""Shell completion of both CLIs: the scripts typer installs, names completed from a running coordinator."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshd.control import ControlClient, Enrollment, NodeKeys
from tests.coordinator.test_cli import cli, free_port, start_server, stop_server

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("prog", ["coordinator", "meshd"])
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_show_completion_prints_the_script(prog: str, shell: str) -> None:
    # typer detects the user's shell; with detection off (its documented test switch) the shell is named
    env = dict(os.environ, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    r = subprocess.run(
        [str(BIN / prog), "--show-completion", shell], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    assert f"_{prog.upper()}_COMPLETE" in r.stdout and f"complete_{shell}" in r.stdout


def install_bash_completion(home: Path, prog: str = "coordinator") -> Path:
    """`PROG --install-completion bash` with HOME=home; the script it wrote."""
    env = dict(os.environ, HOME=str(home), _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    r = subprocess.run(
        [str(BIN / prog), "--install-completion", "bash"], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    script = home / ".bash_completions" / f"{prog}.sh"
    assert str(script) in r.stdout
    return script


def bash_tab(script: Path, words: list[str]) -> list[str]:
    """Press TAB in a real bash: source the installed script and run its completion function on
    ``words`` (the last one is being typed); the candidates it offers."""
    run = (
        'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); '
        '_coordinator_completion coordinator; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    r = subprocess.run(
        ["bash", "-c", run, "tab", str(script), *words], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.parametrize("prog", ["coordinator", "meshd"])
def test_install_completion_bash_writes_the_script_and_sources_it(tmp_path: Path, prog: str) -> None:
    script = install_bash_completion(tmp_path, prog)
    text = script.read_text()
    assert (
        f"_{prog.upper()}_COMPLETE=complete_bash" in text
        and f"complete -o default -F _{prog}_completion {prog}" in text
    )
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()
    # a login shell reading that .bashrc has the completion registered
    r = subprocess.run(
        ["bash", "-c", f"source {tmp_path / '.bashrc'}; complete -p {prog}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, HOME=str(tmp_path)),
    )
    assert r.returncode == 0 and f"_{prog}_completion" in r.stdout, r.stderr


def complete(prog: str, words: str, shell: str = "bash") -> subprocess.CompletedProcess[str]:
    """What the installed script does on TAB: run the CLI with the completion variables set."""
    env = dict(os.environ, **{f"_{prog.upper()}_COMPLETE": f"complete_{shell}"})
    if shell == "bash":
        env.update(COMP_WORDS=words, COMP_CWORD=str(len(words.split()) - (0 if words.endswith(" ") else 1)))
    else:
        env.update(_TYPER_COMPLETE_ARGS=words, _TYPER_COMPLETE_FISH_ACTION="get-args")
    return subprocess.run([str(BIN / prog)], capture_output=True, text=True, env=env, timeout=60)


def test_node_and_user_names_complete_from_the_running_coordinator(tmp_path: Path) -> None:
    state, port = tmp_path / "state", free_port()
    proc = start_server(state, port)
    try:
        for user in ("alice", "albert", "bob"):
            assert cli(state, "users", "create", user).returncode == 0
        key = cli(state, "keys", "create", "--user", "alice", "--reusable").stdout.split()[-1]

        async def enroll(names: tuple[str, ...]) -> None:
            for name in names:
                async with ControlClient(f"http://127.0.0.1:{port}", NodeKeys.generate()) as c:
                    assert isinstance(await c.register(name, auth_key=key), Enrollment)

        asyncio.run(enroll(("web1", "web2", "db1")))
        head = f"coordinator --state-dir {state}"
        assert complete("coordinator", f"{head} nodes remove we").stdout.split() == ["web1", "web2"]
        assert complete("coordinator", f"{head} nodes rename ").stdout.split() == ["db1", "web1", "web2"]
        assert complete("coordinator", f"{head} keys create --user al").stdout.split() == ["albert", "alice"]
        zsh = complete("coordinator", f"{head} nodes tag d", shell="zsh")
        assert '"db1"' in zsh.stdout, zsh.stdout
        fish = complete("coordinator", f"{head} nodes expire w", shell="fish")
        assert fish.stdout.split() == ["web1", "web2"], fish.stdout
    finally:
        stop_server(proc)
    # the coordinator is gone: completion offers nothing, says nothing, and does not hang
    t0 = time.monotonic()
    r = complete("coordinator", f"coordinator --state-dir {state} nodes remove we")
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr == ""
    assert time.monotonic() - t0 < 30


def test_peer_names_fail_silently_without_a_running_meshd(tmp_path: Path) -> None:
    r = complete("meshd", f"meshd ping --state-dir {tmp_path} b")
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr == ""
