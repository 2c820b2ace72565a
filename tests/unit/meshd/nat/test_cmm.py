"""The call-me-maybe signal (meshd/proto/cmm.py): round trip, the wire shape, and hostile payloads."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto.cmm import CallMeMaybe, CallMeMaybeError
from meshd.proto.netmap import MAX_CANDIDATES


def test_the_wire_shape_is_unchanged() -> None:
    cmm = CallMeMaybe((("203.0.113.7", 41641), ("2001:db8::1", 5)), 1767225600.25)
    assert cmm.encode() == {
        "type": "cmm",
        "candidates": ["203.0.113.7:41641", "[2001:db8::1]:5"],
        "at": 1767225600.25,
    }
    assert CallMeMaybe.decode(json.loads(json.dumps(cmm.encode()))) == cmm


def test_an_integer_moment_and_unknown_fields_are_accepted() -> None:
    got = CallMeMaybe.decode({"type": "cmm", "candidates": [], "at": 17, "later": "field"})
    assert got == CallMeMaybe((), 17.0) and isinstance(got.at, float)


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        {"type": "candidates", "candidates": [], "at": 1.0},
        {"candidates": [], "at": 1.0},
        {"type": "cmm", "at": 1.0},
        {"type": "cmm", "candidates": "1.2.3.4:5", "at": 1.0},
        {"type": "cmm", "candidates": [], "at": True},
        {"type": "cmm", "candidates": [], "at": "1.0"},
        {"type": "cmm", "candidates": []},
        {"type": "cmm", "candidates": [], "at": math.nan},
        {"type": "cmm", "candidates": [], "at": math.inf},
        {"type": "cmm", "candidates": [], "at": 10**400},
        {"type": "cmm", "candidates": ["1.2.3.4:5"] * (MAX_CANDIDATES + 1), "at": 1.0},
        {"type": "cmm", "candidates": [5], "at": 1.0},
        {"type": "cmm", "candidates": ["1.2.3.4"], "at": 1.0},
        {"type": "cmm", "candidates": ["1.2.3.4:0"], "at": 1.0},
        {"type": "cmm", "candidates": ["1.2.3.4:65536"], "at": 1.0},
        {"type": "cmm", "candidates": ["host.example:5"], "at": 1.0},
        {"type": "cmm", "candidates": ["2001:db8::1:5"], "at": 1.0},
        {"type": "cmm", "candidates": ["[1.2.3.4]:5"], "at": 1.0},
        {"type": "cmm", "candidates": ["1.2.3.4:\u0665"], "at": 1.0},  # a non-ASCII digit
        {"type": "cmm", "candidates": ["1.2.3.4:" + "0" * 80 + "5"], "at": 1.0},
    ],
)
def test_malformed_payloads_are_refused(payload: Any) -> None:
    with pytest.raises(CallMeMaybeError):
        CallMeMaybe.decode(payload)


json_ish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=40) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=60,
)
cmm_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["cmm", "other"]) | json_ish,
        "candidates": st.lists(
            st.from_regex(r"\A\[?[0-9a-f.:]{0,40}\]?:[0-9]{0,6}\Z") | json_ish, max_size=MAX_CANDIDATES + 2
        )
        | json_ish,
        "at": st.floats() | st.integers() | json_ish,
    }
)


@given(json_ish | cmm_like)
def test_any_json_ish_payload_decodes_or_raises_only_call_me_maybe_error(payload: Any) -> None:
    try:
        got = CallMeMaybe.decode(payload)
    except CallMeMaybeError:
        return
    assert math.isfinite(got.at) and len(got.candidates) <= MAX_CANDIDATES
    assert CallMeMaybe.decode(got.encode()) == got


@given(
    st.lists(st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).map(str), max_size=MAX_CANDIDATES),
    st.lists(st.integers(1, 65535), min_size=MAX_CANDIDATES, max_size=MAX_CANDIDATES),
    st.floats(allow_nan=False, allow_infinity=False),
)
def test_every_valid_message_round_trips(hosts: list[str], ports: list[int], at: float) -> None:
    cmm = CallMeMaybe(tuple(zip(hosts, ports, strict=False)), at)
    assert CallMeMaybe.decode(json.loads(json.dumps(cmm.encode()))) == cmm
