"""Pure parts of the lab (no root): kinds, rulesets, miniupnpd config, echo.py's address parser."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.netns.lab import NatKind
from tests.netns.lab.nat import miniupnpd_conf, parse_kind, ruleset
from tests.netns.lab.topology import ECHO_SCRIPT

spec = importlib.util.spec_from_file_location("lab_echo", ECHO_SCRIPT)
assert spec is not None and spec.loader is not None
echo = importlib.util.module_from_spec(spec)
sys.modules["lab_echo"] = echo
spec.loader.exec_module(echo)


@pytest.mark.parametrize("kind", [k for k in NatKind if k is not NatKind.PUBLIC])
def test_every_router_masquerades_and_only_nofw_lacks_the_input_drop(kind):
    text = ruleset(kind)
    assert 'oifname "wan0" masquerade' in text
    input_chain = text.split("chain input")[1].split("chain forward")[0]
    assert ('iifname "wan0" ct state new drop' in input_chain) is (kind is not NatKind.EIM_NOFW)


def test_edm_is_fully_random_and_udp_blocked_drops_udp():
    assert "masquerade random,fully-random" in ruleset(NatKind.EDM)
    assert 'oifname "wan0" meta l4proto udp drop' in ruleset(NatKind.UDP_BLOCKED)
    assert "l4proto udp drop" not in ruleset(NatKind.EIM)


def test_public_has_no_ruleset_and_unknown_kinds_are_named():
    with pytest.raises(ValueError, match="no router"):
        ruleset(NatKind.PUBLIC)
    with pytest.raises(ValueError, match=r"unknown NAT kind 'x' \(valid: public, eim, eim-nofw, edm, upnp"):
        parse_kind("x")
    assert parse_kind("eim-nofw") is NatKind.EIM_NOFW


def test_miniupnpd_conf_is_secure_and_allows_only_the_lan():
    conf = miniupnpd_conf(
        ext_ifname="wan0", listening_ip="lan0", lan_cidr="192.168.1.0/24", uuid="u", lease_file="/x"
    )
    lines = conf.splitlines()
    assert "secure_mode=yes" in lines and "enable_natpmp=yes" in lines
    assert lines[-2:] == ["allow 1024-65535 192.168.1.0/24 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535"]


@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_echo_addr_round_trips(ip, port):
    assert echo._addr(f"{ip}:{port}") == (str(ip), port)


@given(st.text(max_size=30) | st.from_regex(r"\A[a-z0-9.]{0,5}:[0-9]{1,7}\Z"))
def test_echo_addr_rejects_garbage_with_argparse_errors_only(text):
    try:
        host, port = echo._addr(text)
    except argparse.ArgumentTypeError as exc:
        assert "HOST:PORT" in str(exc)
    else:
        assert host and 0 <= port <= 65535 and text.startswith(f"{host}:")
