"""Stateless enrollment challenges (coordinator/challenges.py): only this coordinator's key makes one that
opens, the ephemeral key follows from the challenge, and tampered, expired or foreign ones are refused."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey

from coordinator import challenges

KEY = challenges.derive_key(b"s" * 32)
NOW = 1_700_000_000.0


def test_an_issued_challenge_opens_to_the_same_ephemeral_key_and_expiry() -> None:
    challenge, ephemeral, expires = challenges.issue(KEY, 60, NOW)
    assert len(challenge) == challenges.CHALLENGE_LEN == 32  # what every meshd decodes and signs
    assert expires == NOW + 60
    opened = challenges.open_challenge((KEY,), challenge, NOW + 59)
    assert bytes(opened.ephemeral) == bytes(ephemeral) and opened.expires_at == expires
    # the node's proof of its WireGuard key opens with the re-derived key
    node = PrivateKey.generate()
    box = Box(node, ephemeral.public_key).encrypt(challenge)
    assert Box(opened.ephemeral, node.public_key).decrypt(box) == challenge


def test_challenges_are_fresh() -> None:
    a, ka, _ = challenges.issue(KEY, 60, NOW)
    b, kb, _ = challenges.issue(KEY, 60, NOW)
    assert a != b and bytes(ka) != bytes(kb)


def test_an_expired_challenge_is_refused() -> None:
    challenge, _, _ = challenges.issue(KEY, 60, NOW)
    with pytest.raises(challenges.Expired):
        challenges.open_challenge((KEY,), challenge, NOW + 60)


@pytest.mark.parametrize("index", range(32))
def test_a_challenge_with_any_byte_changed_is_refused(index: int) -> None:
    challenge, _, _ = challenges.issue(KEY, 60, NOW)
    tampered = bytearray(challenge)
    tampered[index] ^= 0x01  # the nonce, the expiry (e.g. a later one) or the tag
    with pytest.raises(challenges.ChallengeError) as err:
        challenges.open_challenge((KEY,), bytes(tampered), NOW)
    assert type(err.value) is challenges.ChallengeError  # the tag is checked before the expiry


def test_a_later_expiry_cannot_be_forged() -> None:
    challenge, _, _ = challenges.issue(KEY, 60, NOW)
    later = challenge[:12] + int(NOW + 3600).to_bytes(4, "big") + challenge[16:]
    with pytest.raises(challenges.ChallengeError):
        challenges.open_challenge((KEY,), later, NOW + 120)


def test_another_coordinators_challenge_is_refused() -> None:
    other = challenges.derive_key(os.urandom(32))
    challenge, _, _ = challenges.issue(other, 60, NOW)
    with pytest.raises(challenges.ChallengeError):
        challenges.open_challenge((KEY,), challenge, NOW)


def test_after_a_signing_key_rotation_the_previous_key_opens_for_one_lifetime() -> None:
    keys = challenges.Keys(lifetime=60)
    old_seed, new_seed = b"a" * 32, b"b" * 32
    challenge, _, _ = challenges.issue(keys.current(old_seed, NOW), 60, NOW)
    accepted = keys.accepted(new_seed, NOW + 1)  # rotated
    assert challenges.open_challenge(accepted, challenge, NOW + 1).challenge == challenge
    # past the overlap only the new key is accepted (and the challenge would have expired anyway)
    assert keys.accepted(new_seed, NOW + 63) == (challenges.derive_key(new_seed),)
    with pytest.raises(challenges.ChallengeError):
        challenges.open_challenge(keys.accepted(new_seed, NOW + 63), challenge, NOW + 1)


@given(st.binary(max_size=64))
def test_the_parser_refuses_or_opens_any_bytes_without_crashing(data: bytes) -> None:
    try:
        challenges.open_challenge((KEY,), data, NOW)
    except challenges.ChallengeError:
        return
    raise AssertionError("random bytes opened as a challenge")


@given(st.binary(min_size=32, max_size=32))
def test_parse_reads_any_32_bytes(data: bytes) -> None:
    body, expires, tag = challenges.parse(data)
    assert body + tag == data and expires == int.from_bytes(data[12:16], "big")
