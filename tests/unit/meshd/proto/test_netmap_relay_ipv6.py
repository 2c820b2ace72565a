"""The relay map's optional ``ipv6`` (issue 15): absent, a region keeps its bytes; present, it is a
unicast IPv6 address, normalised; anything else is refused with a NetmapError, never another exception."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto.netmap import NetmapError, RelayRegion, relay_from_json, relay_to_json

BASE: dict[str, Any] = {"id": 1, "name": "default", "url": "http://7.0.0.1:8080", "stun_port": 3478}


def test_without_ipv6_the_json_is_what_it_was() -> None:
    region = RelayRegion(1, "default", "http://7.0.0.1:8080", 3478)
    assert relay_to_json(region) == BASE
    assert relay_from_json(BASE) == region


def test_ipv6_round_trips_normalised() -> None:
    region = relay_from_json({**BASE, "ipv6": "2001:DB8:0::7:1"})
    assert region.ipv6 == "2001:db8::7:1"
    assert relay_to_json(region) == {**BASE, "ipv6": "2001:db8::7:1"}
    assert relay_from_json(json.loads(json.dumps(relay_to_json(region)))) == region


@pytest.mark.parametrize(
    "bad", ["7.0.0.1", "::", "fe80::1", "ff02::1", "fe80::1%eth0", "x", 5, None, "1" * 100]
)
def test_bad_ipv6_is_refused(bad: object) -> None:
    with pytest.raises(NetmapError, match="ipv6"):
        relay_from_json({**BASE, "ipv6": bad})


@given(st.one_of(st.text(max_size=80), st.integers(), st.none(), st.lists(st.integers(), max_size=2)))
def test_any_ipv6_value_parses_or_is_a_netmap_error(value: object) -> None:
    try:
        region = relay_from_json({**BASE, "ipv6": value})
    except NetmapError:
        return
    assert region.ipv6 == "" or ":" in region.ipv6


@given(st.ip_addresses(v=6))
def test_every_unicast_ipv6_address_is_accepted(ip: Any) -> None:
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return
    assert relay_from_json({**BASE, "ipv6": str(ip)}).ipv6 == str(ip)
