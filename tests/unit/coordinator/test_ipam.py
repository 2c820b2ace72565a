"""Overlay addresses and names (coordinator.ipam)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.ipam import AddressPool, IpamError, dns_label, is_dns_label, random_ula48, unique_name


def test_ula_is_a_random_rfc4193_48() -> None:
    a, b = random_ula48(), random_ula48()
    net = ipaddress.IPv6Network(a)
    assert net.prefixlen == 48 and str(net).startswith("fd") and a != b


def test_pool_never_hands_out_a_live_address_twice_and_reuses_released_ones() -> None:
    pool = AddressPool("10.0.0.0/29", "fd00:1:2::/48")
    got = [pool.allocate() for _ in range(6)]
    assert [v4 for v4, _ in got] == [f"10.0.0.{i}" for i in range(1, 7)]
    assert got[0][1] == "fd00:1:2::1"
    with pytest.raises(IpamError, match="exhausted"):
        pool.allocate()
    pool.release("10.0.0.3")
    assert pool.allocate()[0] == "10.0.0.3"


@given(st.lists(st.booleans(), max_size=60))
def test_live_addresses_stay_unique(ops: list[bool]) -> None:
    pool = AddressPool("10.0.0.0/28", "fd00::/48")
    live: list[str] = []
    for allocate in ops:
        if allocate or not live:
            try:
                v4, _ = pool.allocate()
            except IpamError:
                assert len(live) == 14
                continue
            assert v4 not in live
            live.append(v4)
        else:
            pool.release(live.pop(0))


@given(st.text(max_size=80))
def test_dns_label_is_always_valid(hostname: str) -> None:
    assert is_dns_label(dns_label(hostname))


def test_name_clashes_get_a_suffix() -> None:
    assert dns_label("My_Laptop.local") == "my-laptop"
    assert unique_name("a", {"a", "a-1"}) == "a-2"
    assert len(unique_name("x" * 63, {"x" * 63})) <= 63
