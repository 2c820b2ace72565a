"""The systemd units in packaging/systemd parse cleanly (systemd-analyze verify reports nothing)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
UNITS = ROOT / "packaging" / "systemd"


@pytest.mark.parametrize("name", ["meshd", "coordinator"])
def test_unit_verifies(name: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    text = (UNITS / f"{name}.service").read_text()
    assert f"ExecStart=/usr/local/bin/{name} " in text
    assert "Type=notify" in text and "Restart=on-failure" in text and f"StateDirectory={name}" in text
    # verify needs the program to exist: point ExecStart at this venv's console script
    exe = Path(sys.executable).parent / name
    unit = tmp_path / f"{name}.service"
    unit.write_text(text.replace(f"/usr/local/bin/{name}", str(exe)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
