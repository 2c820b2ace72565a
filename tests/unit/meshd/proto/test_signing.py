"""Signed request envelope and enrollment proofs (meshd.proto.signing)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import signing

KEY = bytes(range(32))
PUB = signing.public_key_of(KEY)
NOW = 1_800_000_000.0


def test_a_signed_request_verifies() -> None:
    h = signing.sign_request(KEY, "7", "post", "/api/v1/cert/renew?x=1", b"{}", NOW)
    env = signing.parse_headers(h)
    assert env.node == "7" and env.timestamp == int(NOW) and len(env.nonce) == 32
    signing.verify_request(env, PUB, "POST", "/api/v1/cert/renew?x=1", b"{}", NOW + 59)


@pytest.mark.parametrize(
    ("method", "target", "body", "now", "reason"),
    [
        ("GET", "/api/v1/cert/renew?x=1", b"{}", NOW, "bad request signature"),
        ("POST", "/api/v1/cert/renew", b"{}", NOW, "bad request signature"),
        ("POST", "/api/v1/cert/renew?x=1", b"{ }", NOW, "bad request signature"),
        ("POST", "/api/v1/cert/renew?x=1", b"{}", NOW + 61, "stale timestamp"),
        ("POST", "/api/v1/cert/renew?x=1", b"{}", NOW - 61, "stale timestamp"),
    ],
)
def test_any_change_or_staleness_is_rejected(
    method: str, target: str, body: bytes, now: float, reason: str
) -> None:
    env = signing.parse_headers(signing.sign_request(KEY, "7", "POST", "/api/v1/cert/renew?x=1", b"{}", NOW))
    with pytest.raises(signing.SignatureError, match=reason):
        signing.verify_request(env, PUB, method, target, body, now)


def test_another_key_does_not_verify() -> None:
    env = signing.parse_headers(signing.sign_request(os.urandom(32), "7", "GET", "/", b"", NOW))
    with pytest.raises(signing.SignatureError):
        signing.verify_request(env, PUB, "GET", "/", b"", NOW)


def test_enrollment_signature_binds_every_field() -> None:
    ch, wg, node = os.urandom(32), os.urandom(32), PUB
    sig = signing.sign_enrollment(KEY, ch, wg, node, "host")
    signing.verify_enrollment(sig, ch, wg, node, "host")
    for args in (
        (os.urandom(32), wg, node, "host"),
        (ch, os.urandom(32), node, "host"),
        (ch, wg, node, "hosT"),
    ):
        with pytest.raises(signing.SignatureError):
            signing.verify_enrollment(sig, *args)


def test_enrollment_message_is_unambiguous() -> None:
    assert signing.enrollment_message(b"ab", b"c", b"", "") != signing.enrollment_message(
        b"a", b"bc", b"", ""
    )


header = st.text(max_size=120)


@given(
    node=header,
    ts=header,
    nonce=header,
    sig=header,
    drop=st.sets(
        st.sampled_from(
            [signing.HEADER_NODE, signing.HEADER_TIMESTAMP, signing.HEADER_NONCE, signing.HEADER_SIGNATURE]
        )
    ),
)
def test_any_headers_raise_only_signature_error(
    node: str, ts: str, nonce: str, sig: str, drop: set[str]
) -> None:
    h = {
        signing.HEADER_NODE: node,
        signing.HEADER_TIMESTAMP: ts,
        signing.HEADER_NONCE: nonce,
        signing.HEADER_SIGNATURE: sig,
    }
    for name in drop:
        del h[name]
    try:
        env = signing.parse_headers(h)
        signing.verify_request(env, PUB, "GET", "/", b"", NOW)
    except signing.SignatureError:
        pass


@given(key=st.binary(min_size=0, max_size=40), sig=st.binary(max_size=70), msg=st.binary(max_size=64))
def test_verify_with_any_key_or_signature_bytes_raises_only_signature_error(
    key: bytes, sig: bytes, msg: bytes
) -> None:
    with pytest.raises(signing.SignatureError):
        signing.verify_enrollment(sig, msg, b"", key, "h")
