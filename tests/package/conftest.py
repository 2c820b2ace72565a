"""The package under test, built once per session by scripts/package (or MESHVPN_TEST_DEB)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.package.test_deb_install import ROOT, _why_not


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _why_not()
    if reason:
        pytest.skip(f"cannot build and install the package here: {reason}")
    if os.environ.get("MESHVPN_TEST_DEB"):  # a package built before (scripts/package, lintian included)
        return Path(os.environ["MESHVPN_TEST_DEB"])
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        ["bash", str(ROOT / "scripts/package"), "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert r.returncode == 0, f"scripts/package failed (lintian errors fail it):\n{r.stderr[-6000:]}"
    return Path(r.stdout.strip().splitlines()[-1])
