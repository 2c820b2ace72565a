"""meshd.rotation: the --key-rotation interval and the key's age record."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshd import rotation
from meshd.cli import app


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400.0), ("12h", 43200.0), ("90m", 5400.0), ("3600", 3600.0), ("0", 0.0)],
)
def test_intervals(text: str, seconds: float) -> None:
    assert rotation.parse_interval(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1d", "5s", "1y", "1.d"])
def test_bad_intervals_are_one_line_errors(text: str) -> None:
    with pytest.raises(rotation.IntervalError):
        rotation.parse_interval(text)
    r = CliRunner().invoke(app, ["up", "--key-rotation", text])
    assert r.exit_code == 1 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1


def test_key_age_starts_on_first_read_and_is_kept(tmp_path: Path) -> None:
    assert rotation.key_created(tmp_path, now=1000.0) == 1000.0
    assert rotation.key_created(tmp_path, now=5000.0) == 1000.0
    rotation.record_key_created(tmp_path, 7000.0)
    assert rotation.key_created(tmp_path) == 7000.0
    assert (tmp_path / rotation.AGE_FILE).stat().st_mode & 0o777 == 0o600
