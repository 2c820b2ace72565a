"""The address pool never hands out meshd's resolver address (meshd/dns/__init__.py)."""

from __future__ import annotations

import pytest

from coordinator.ipam import AddressPool, IpamError
from meshd.dns import RESOLVER_IPV4


def test_the_resolver_address_is_skipped_in_a_prefix_holding_it() -> None:
    pool = AddressPool("100.100.100.96/29", "fd00:1:2::/48")  # .97 .. .102: the resolver is .100
    got = [pool.allocate()[0] for _ in range(5)]
    assert RESOLVER_IPV4 not in got
    assert got == ["100.100.100.97", "100.100.100.98", "100.100.100.99", "100.100.100.101", "100.100.100.102"]
    with pytest.raises(IpamError):
        pool.allocate()


def test_a_prefix_without_it_loses_nothing() -> None:
    pool = AddressPool("10.0.0.0/29", "fd00:1:2::/48")
    assert len({pool.allocate()[0] for _ in range(6)}) == 6
