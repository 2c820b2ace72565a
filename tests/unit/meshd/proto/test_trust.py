"""meshd.proto.trust: endorsed signing keys are accepted, anything else is not."""

from __future__ import annotations

import contextlib
import os

from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from meshd.proto import trust


def _key() -> tuple[bytes, bytes]:
    seed = os.urandom(32)
    return seed, bytes(SigningKey(seed).verify_key)


def test_chain_of_endorsements_is_accepted_and_unannounced_keys_are_dropped() -> None:
    s1, k1 = _key()
    s2, k2 = _key()
    _, k3 = _key()
    chain = (
        trust.AnnouncedKey(k3, k2, trust.endorse(s2, k3)),
        trust.AnnouncedKey(k2, k1, trust.endorse(s1, k2)),
    )
    assert trust.accept((k1,), chain) == (k3, k2), "k1 no longer announced: dropped"
    assert trust.accept((k1,), trust.decode(trust.encode(chain))) == (k3, k2)


def test_forged_or_misattributed_endorsements_are_refused() -> None:
    _, k1 = _key()
    s_evil, k_evil = _key()
    _, k_new = _key()
    forged = trust.AnnouncedKey(k_new, k1, trust.endorse(s_evil, k_new))
    assert trust.accept((k1,), [trust.AnnouncedKey(k1), forged]) == (k1,)
    self_signed = trust.AnnouncedKey(k_evil, k_evil, trust.endorse(s_evil, k_evil))
    assert trust.accept((k1,), [self_signed]) == (k1,), "trust is never emptied"


@given(
    st.recursive(st.none() | st.text() | st.integers(), lambda c: st.lists(c) | st.dictionaries(st.text(), c))
)
def test_decode_never_raises_anything_but_trust_error(doc: object) -> None:
    with contextlib.suppress(trust.TrustError):
        trust.decode(doc)
