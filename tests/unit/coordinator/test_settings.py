"""Settings precedence: flag > environment > TOML file > default (coordinator.settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.settings import SettingsError, load_settings, parse_duration


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('listen = "127.0.0.1:1"\nprefix = "10.0.0.0/8"\ncert-lifetime = "2h"\ndomain = "toml"\n')
    env = {"COORDINATOR_LISTEN": "127.0.0.1:2", "COORDINATOR_DOMAIN": "env"}
    s = load_settings({"listen": "127.0.0.1:3", "domain": None}, env, toml)
    assert s.listen == "127.0.0.1:3" and s.domain == "env" and s.prefix == "10.0.0.0/8"
    assert s.cert_lifetime == 7200


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"listen": "nope"}, "bad listen"),
        ({"prefix": "10.0.0.1/8"}, "bad prefix"),
        ({"prefix": "fd00::/8"}, "IPv4"),
        ({"cert_lifetime": "soon"}, "bad duration"),
        ({"tls_cert": "/x"}, "go together"),
    ],
)
def test_bad_settings_are_one_line_errors(flags: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(flags, {})


def test_bad_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({}, {}, bad)
    bad.write_text("colour = 1\n")
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings({}, {}, bad)


def test_durations() -> None:
    assert [parse_duration(x) for x in ("90", "30s", "15m", "1h", "7d")] == [90, 30, 900, 3600, 604800]
