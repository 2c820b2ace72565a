"""meshd's `--coordinator URL[,URL...]`: replicas of one coordinator, failed over between (issue 16)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshd.control import ControlClient, NodeKeys
from meshd.options import coordinator_urls


def test_one_url_stays_one_url_and_several_keep_their_order_without_duplicates() -> None:
    assert coordinator_urls("http://c:8080/") == ("http://c:8080",)
    assert coordinator_urls("http://a:1, http://b:2/,http://a:1,") == ("http://a:1", "http://b:2")
    assert coordinator_urls("") == () and coordinator_urls(" , ") == ()
    assert coordinator_urls("/") == () and coordinator_urls("x /, //") == ("x",)  # found by hypothesis


@given(st.text(max_size=200))
def test_any_text_gives_clean_urls_or_none(text: str) -> None:
    urls = coordinator_urls(text)
    assert len(set(urls)) == len(urls)
    assert all(u and "," not in u and u == u.strip() and not u.endswith("/") for u in urls)


async def test_fail_over_moves_every_later_request_to_the_next_url_in_turn() -> None:
    client = ControlClient("http://r1:1/", NodeKeys.generate(), fallbacks=("http://r2:2", "http://r1:1"))
    try:
        assert client.urls == ("http://r1:1", "http://r2:2")
        assert client.fail_over() and client.url == "http://r2:2"
        assert str(client._http.base_url).rstrip("/") == "http://r2:2"
        assert client.fail_over() and client.url == "http://r1:1"
        single = ControlClient("http://only:1", NodeKeys.generate())
        assert not single.fail_over() and single.url == "http://only:1"
        await single.aclose()
    finally:
        await client.aclose()
