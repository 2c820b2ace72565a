"""Inbound rules in the map (meshd.proto.policy): codec round trip, strictness."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import policy
from meshd.proto.policy import ALLOW_ALL, InboundRule, RuleError

rules = st.lists(
    st.builds(
        InboundRule,
        sources=st.lists(
            st.sampled_from(["100.64.0.1/32", "10.0.0.0/8", "::/0", "fd7a::2/128"]), max_size=3
        ).map(tuple),
        proto=st.sampled_from(policy.PROTOCOLS),
        ports=st.lists(st.tuples(st.integers(0, 100), st.integers(100, 65535)), max_size=3).map(tuple),
    ),
    max_size=4,
).map(tuple)


@given(rules)
def test_rules_survive_json(rs: tuple[InboundRule, ...]) -> None:
    assert policy.rules_from_json(json.loads(json.dumps(policy.rules_to_json(rs)))) == rs


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c) | st.dictionaries(st.sampled_from(["src", "proto", "ports"]), c),
    )
)
def test_any_json_is_rules_or_rule_error(raw: object) -> None:
    with contextlib.suppress(RuleError):
        policy.rules_from_json(raw)


@pytest.mark.parametrize(
    "raw",
    [
        [{"src": ["nope"], "proto": "tcp", "ports": []}],
        [{"src": [], "proto": "sctp", "ports": []}],
        [{"src": [], "proto": "tcp", "ports": [[90, 80]]}],
        [{"src": [], "proto": "tcp", "ports": [[1, 70000]]}],
        [{"src": [], "proto": "tcp", "ports": [[True, 2]]}],
    ],
)
def test_bad_rules_are_rejected(raw: object) -> None:
    with pytest.raises(RuleError):
        policy.rules_from_json(raw)


def test_allow_all_is_recognised() -> None:
    assert policy.allows_everything(ALLOW_ALL)
    assert not policy.allows_everything(())
    assert not policy.allows_everything((InboundRule(("0.0.0.0/0", "::/0"), "tcp", ()),))
