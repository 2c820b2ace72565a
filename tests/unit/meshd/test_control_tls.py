"""meshd/control.py: the CA bundle is loaded only for a coordinator reached over HTTPS (issue 15: ~18 ms of
CPU at every start for a plain-HTTP one), and a plain-HTTP client still fails closed on TLS."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from meshd.control import ControlClient, NodeKeys


def _count_default_contexts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = ssl.create_default_context

    def counting(*args: Any, **kw: Any) -> ssl.SSLContext:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    return calls


def test_a_plain_http_coordinator_loads_no_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_default_contexts(monkeypatch)
    client = ControlClient("http://127.0.0.1:1", NodeKeys.generate(), fallbacks=("http://127.0.0.2:1",))
    assert calls == []
    assert client.ssl_context is None  # relay links over wss still get the system defaults


@pytest.mark.parametrize(
    "url, fallbacks", [("https://coord.example:443", ()), ("http://127.0.0.1:1", ("https://coord.example",))]
)
def test_any_https_url_gets_the_system_ca_bundle(
    monkeypatch: pytest.MonkeyPatch, url: str, fallbacks: tuple[str, ...]
) -> None:
    calls = _count_default_contexts(monkeypatch)
    ControlClient(url, NodeKeys.generate(), fallbacks=fallbacks)
    assert calls, "httpx did not build its verifying context from the system CA bundle"


async def test_tls_through_a_plain_http_client_fails_closed() -> None:
    """The context a plain-HTTP client holds verifies, with no CA: it trusts nothing."""
    client = ControlClient("http://127.0.0.1:1", NodeKeys.generate())
    try:
        transport: Any = client._http._transport  # the context httpx would use
        ctx = transport._pool._ssl_context
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        assert ctx.cert_store_stats()["x509_ca"] == 0
    finally:
        await client.aclose()
