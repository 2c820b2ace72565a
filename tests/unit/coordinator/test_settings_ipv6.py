"""``--listen-ipv6`` (issue 15): an IPv6 address of this host, or a one-line SettingsError."""

from __future__ import annotations

import pytest

from coordinator.settings import SettingsError, load_settings


def test_listen_ipv6_is_normalised() -> None:
    s = load_settings({"listen": "7.0.0.1:8080", "listen_ipv6": "2001:DB8::7:1"}, {})
    assert s.listen_ipv6_addr == "2001:db8::7:1"
    assert load_settings({}, {}).listen_ipv6_addr is None
    assert load_settings({}, {"COORDINATOR_LISTEN_IPV6": "[2001:db8::1]"}).listen_ipv6_addr == "2001:db8::1"


@pytest.mark.parametrize("bad", ["::", "7.0.0.1", "fe80::1", "ff02::1", "host.example", "2001:db8::1:8080:x"])
def test_bad_listen_ipv6_is_a_one_line_error(bad: str) -> None:
    with pytest.raises(SettingsError, match="listen_ipv6") as e:
        load_settings({"listen_ipv6": bad}, {})
    assert "\n" not in str(e.value)
