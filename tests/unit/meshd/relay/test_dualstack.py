"""The URLs tried for a relay region (issue 15): its own, then the same at its IPv6 address."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshd.proto.netmap import RelayRegion
from meshd.relay.dualstack import relay_urls


def region(url: str, ipv6: str = "") -> RelayRegion:
    return RelayRegion(1, "default", url, 3478, ipv6)


def test_ipv4_literal_url_gets_an_ipv6_twin() -> None:
    assert relay_urls(region("http://7.0.0.1:8080", "2001:db8::7:1")) == [
        "http://7.0.0.1:8080",
        "http://[2001:db8::7:1]:8080",
    ]
    assert relay_urls(region("https://7.0.0.1", "2001:db8::1")) == [
        "https://7.0.0.1",
        "https://[2001:db8::1]",
    ]


def test_no_twin_without_ipv6_or_for_names_and_ipv6_urls() -> None:
    assert relay_urls(region("http://7.0.0.1:8080")) == ["http://7.0.0.1:8080"]
    assert relay_urls(region("https://relay.example:443", "2001:db8::1")) == ["https://relay.example:443"]
    assert relay_urls(region("http://[2001:db8::2]:80", "2001:db8::1")) == ["http://[2001:db8::2]:80"]


@given(st.text(max_size=60))
def test_any_url_gives_it_first_and_never_raises(url: str) -> None:
    urls = relay_urls(region(url, "2001:db8::1"))
    assert urls[0] == url and len(urls) <= 2
