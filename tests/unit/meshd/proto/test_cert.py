"""Node certificates (meshd.proto.cert): issue, verify, and every reason to refuse."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from meshd.proto import cert
from meshd.proto.encoding import b64encode

SEED = bytes(range(32))
PUB = bytes(SigningKey(SEED).verify_key)
NOW = 1_800_000_000


def payload(**kw: object) -> cert.CertPayload:
    base = cert.CertPayload(
        version=1,
        serial=1,
        name="laptop",
        node_id=3,
        ips=("100.64.0.3/32", "fd00::3/128"),
        wg_public_key=b64encode(b"w" * 32),
        node_public_key=b64encode(b"n" * 32),
        tags=("tag:web",),
        not_before=NOW - 60,
        not_after=NOW + 86400,
        issuer=cert.key_id(PUB),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_issue_then_verify_round_trips() -> None:
    p = payload()
    assert cert.verify(cert.issue(p, SEED), [PUB], NOW) == p


def test_several_trusted_keys_are_accepted() -> None:
    other = bytes(SigningKey(os.urandom(32)).verify_key)
    assert cert.verify(cert.issue(payload(), SEED), [other, PUB], NOW).name == "laptop"


@pytest.mark.parametrize(("now", "reason"), [(NOW + 86400, "expired"), (NOW - 61, "not yet valid")])
def test_validity_window(now: int, reason: str) -> None:
    with pytest.raises(cert.CertError, match=reason):
        cert.verify(cert.issue(payload(), SEED), [PUB], now)


def test_unknown_issuer_and_bad_signature() -> None:
    c = cert.issue(payload(), SEED)
    with pytest.raises(cert.CertError, match="unknown issuer"):
        cert.verify(c, [bytes(SigningKey(os.urandom(32)).verify_key)], NOW)
    body, sig = c.split(".")
    forged = cert.issue(payload(name="mallory"), SEED).split(".")[0] + "." + sig
    with pytest.raises(cert.CertError, match="bad signature"):
        cert.verify(forged, [PUB], NOW)
    assert body


def test_issuer_must_match_the_signing_key() -> None:
    with pytest.raises(cert.CertError, match="issuer"):
        cert.issue(payload(issuer="0" * 16), SEED)


@given(st.text(max_size=300))
def test_any_text_raises_only_cert_error(text: str) -> None:
    with contextlib.suppress(cert.CertError):
        cert.verify(text, [PUB], NOW)


@given(st.binary(max_size=300), st.binary(max_size=80))
def test_any_payload_bytes_raise_only_cert_error(body: bytes, sig: bytes) -> None:
    import base64

    def enc(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    with contextlib.suppress(cert.CertError):
        cert.verify(f"{enc(body)}.{enc(sig)}", [PUB], NOW)


@given(
    st.integers(min_value=0, max_value=2**40),
    st.text(max_size=30),
    st.lists(st.text(max_size=10), max_size=4),
)
def test_round_trip_property(serial: int, name: str, tags: list[str]) -> None:
    p = payload(serial=serial, name=name, tags=tuple(tags))
    assert cert.decode(cert.issue(p, SEED))[0] == p
