"""The Vagrantfile (demo topology on VMs) is valid Ruby and, where Vagrant is installed, a valid config."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_ruby_syntax() -> None:
    if shutil.which("ruby") is None:
        pytest.skip("ruby not installed (scripts/setup installs it)")
    cmd = ["ruby", "-c", str(ROOT / "Vagrantfile")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "Syntax OK", out.stderr


def test_vagrant_validate(tmp_path: Path) -> None:
    if shutil.which("vagrant") is None:
        pytest.skip("vagrant not installed (optional: apt-get install vagrant)")
    shutil.copy(ROOT / "Vagrantfile", tmp_path / "Vagrantfile")  # its .vagrant/ goes to tmp, not the repo
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "home"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    out = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    ok = out.returncode == 0 and "Vagrantfile validated successfully." in out.stdout
    assert ok, out.stdout + out.stderr
    for vm in ("coordinator", "router-a", "router-b", "host-a", "host-b"):
        assert f"==> {vm}:" in out.stdout
