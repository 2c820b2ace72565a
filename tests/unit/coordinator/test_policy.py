"""The policy file: parsing, validation messages, evaluation, tests and per-node compilation."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import policy as pol
from coordinator.policy import Member, PolicyError
from meshd.proto.policy import ALLOW_ALL, InboundRule


def member(i: int, name: str, user: str = "ops", tags: tuple[str, ...] = ()) -> Member:
    return Member(
        i,
        name,
        user,
        frozenset(tags),
        (ipaddress.ip_network(f"100.64.0.{i}/32"), ipaddress.ip_network(f"fd7a::{i}/128")),
    )


A, B, C = member(1, "a", "alice"), member(2, "b", "bob", ("db",)), member(3, "c", "carol")
NODES = (A, B, C)

GOOD = """\
# who is who
[groups]
eng = ["alice", "carol"]

[tag_owners]
"tag:db" = ["group:eng"]

[hosts]
backup = "100.64.0.3"

[[rules]]
src = ["user:alice"]
dst = ["tag:db:22"]
proto = "tcp"

[[rules]]
src = ["group:eng"]
dst = ["backup:*"]
proto = "icmp"

[[tests]]
src = "node:a"
accept = ["node:b:22"]
deny = ["node:b:5432", "node:c:22"]
"""


def problems(text: str, **kw: object) -> list[str]:
    with pytest.raises(PolicyError) as err:
        pol.check(text, **kw)  # type: ignore[arg-type]
    return err.value.problems


def test_a_good_policy_parses_and_its_tests_pass() -> None:
    p = pol.check(GOOD, users={"alice", "bob", "carol"}, members=NODES)
    assert p.groups == {"eng": ("alice", "carol")}
    assert [r.line for r in p.rules] == [11, 16]
    assert p.may_assign("carol", "tag:db") and not p.may_assign("bob", "db")


def test_syntax_errors_name_line_and_column() -> None:
    assert problems('[groups]\neng = ["alice"\n') == ["line 2: Unclosed array (at end of document)"]
    assert problems('[groups]\neng = "alice\nx = 1\n') == ["line 2, column 13: Illegal character '\\n'"]


def test_unknown_group_tag_host_and_user_each_get_a_line() -> None:
    text = """\
[groups]
eng = ["alice"]

[[rules]]
src = ["group:ops"]
dst = ["tag:web:80"]

[[rules]]
src = ["user:mallory"]
dst = ["node:nowhere:22", "node:a:x"]
"""
    assert problems(text, users={"alice"}, members=NODES) == [
        "line 5: unknown group 'group:ops'",
        "line 6: unknown tag 'tag:web' (declare it in [tag_owners])",
        "line 9: unknown user 'mallory'",
        "line 10: unknown node 'nowhere'",
        "line 10: destination 'node:a:x': bad port 'x': use N, N-M, a comma list or *",
    ]


def test_failing_tests_are_named_by_line() -> None:
    text = GOOD.replace('deny = ["node:b:5432", "node:c:22"]', 'deny = ["node:b:22"]')
    assert problems(text, members=NODES) == [
        "line 24: test failed: node:a may reach node:b:22 (tcp)",
    ]
    text = GOOD.replace('accept = ["node:b:22"]', 'accept = ["node:b:5432"]')
    assert problems(text, members=NODES)[0] == "line 23: test failed: node:a may not reach node:b:5432 (tcp)"


def test_structure_errors() -> None:
    assert problems('rules = "x"\n') == ["line 1: rules must be [[rules]] tables"]
    assert problems('[[rules]]\nsrc = ["*"]\n') == ["line 1: a rule needs src and dst"]
    assert problems('[[rules]]\nsrc = "*"\ndst = "*:22"\nproto = "sctp"\n') == [
        "line 4: proto must be one of tcp, udp, icmp, any, not 'sctp'"
    ]
    assert problems('[[rules]]\nsrc = "*"\ndst = "*:22"\nproto = "icmp"\n') == [
        'line 1: icmp has no ports: write destinations as "NAME:*"'
    ]
    assert problems("[acl]\n") == [
        "line 1: unknown section 'acl' (known: groups, hosts, rules, tag_owners, tests)"
    ]
    assert problems('[hosts]\nx = "not-an-ip"\n') == [
        "line 2: host 'x': 'not-an-ip' is not an IP address or network"
    ]


def test_tagged_nodes_are_not_their_users_nodes() -> None:
    p = pol.parse('[[rules]]\nsrc = ["*"]\ndst = ["user:bob:*"]\n')
    assert not pol.allowed(p, A, B, "tcp", 22)
    assert pol.allowed(p, A, member(4, "d", "bob"), "tcp", 22)


def test_a_bare_name_is_refused_with_what_to_write_instead() -> None:
    text = '[[rules]]\nsrc = ["alice"]\ndst = ["bob:22"]\n[[tests]]\nsrc = "alice"\ndeny = ["bob:22"]\n'
    assert problems(text, users={"alice", "bob"}, members=NODES) == [
        'line 2: "alice" is ambiguous: write "user:alice" or "node:alice" (or declare it in [hosts])',
        'line 3: "bob" is ambiguous: write "user:bob" or "node:bob" (or declare it in [hosts])',
        'line 5: "alice" is ambiguous: write "user:alice" or "node:alice" (or declare it in [hosts])',
        'line 6: "bob" is ambiguous: write "user:bob" or "node:bob" (or declare it in [hosts])',
    ]
    assert problems('[[rules]]\nsrc = ["user:alice"]\ndst = ["node:b"]\n') == [
        "line 3: destination 'node:b' needs :PORTS (e.g. :22 or :*)"
    ]


def test_a_node_named_like_a_user_gets_none_of_the_users_grants() -> None:
    """Hostile: mallory enrolls a machine as "alice"; rules for user:alice must not match it."""
    p = pol.check(
        '[groups]\neng = ["alice"]\n[[rules]]\nsrc = ["user:alice", "group:eng"]\ndst = ["user:bob:*"]\n'
        '[[rules]]\nsrc = ["user:bob"]\ndst = ["user:alice:22", "group:eng:80"]\n',
        users={"alice", "bob", "mallory"},
    )
    alice, bob = member(1, "alice-laptop", "alice"), member(2, "bob-pc", "bob")
    impostor = member(3, "alice", "mallory")
    assert pol.allowed(p, alice, bob, "tcp", 22)  # the positive control
    assert not pol.allowed(p, impostor, bob, "tcp", 22)  # as source
    assert pol.allowed(p, bob, alice, "tcp", 22)
    assert not pol.allowed(p, bob, impostor, "tcp", 22)  # as destination
    assert not pol.allowed(p, bob, impostor, "tcp", 80)  # through a group
    c = pol.Compiled(p, (alice, bob, impostor))
    assert c.visible(3) == frozenset() and c.inbound(3) == ()
    assert c.visible(2) == {1} and 3 not in (c.visible(1) or ())
    # node:NAME still names one node, for whoever wants exactly that
    q = pol.parse('[[rules]]\nsrc = ["node:alice"]\ndst = ["node:bob-pc:22"]\n')
    assert pol.allowed(q, impostor, bob, "tcp", 22) and not pol.allowed(q, alice, bob, "tcp", 22)


def test_groups_and_tag_owners_hold_users_bare_or_prefixed_never_nodes() -> None:
    p = pol.parse(
        '[groups]\neng = ["alice", "user:bob"]\n[tag_owners]\n"tag:db" = ["user:carol", "group:eng"]\n'
    )
    assert p.groups == {"eng": ("alice", "bob")}
    assert p.may_assign("carol", "db") and p.may_assign("bob", "db") and not p.may_assign("dave", "db")
    assert problems('[groups]\neng = ["node:a", "tag:db"]\n') == [
        "line 2: group 'eng': 'node:a' is not a user; list users (NAME or user:NAME)",
        "line 2: group 'eng': 'tag:db' is not a user; list users (NAME or user:NAME)",
    ]


def test_policy_tests_use_the_same_unambiguous_names() -> None:
    text = (
        '[[rules]]\nsrc = ["user:alice"]\ndst = ["node:b:22"]\n'
        '[[tests]]\nsrc = "user:alice"\naccept = ["node:b:22"]\n'
    )
    pol.check(text, users={"alice"}, members=NODES)
    # a node *named* alice is not user alice: the test fails when it claims otherwise
    impostor = (*NODES, member(4, "alice", "mallory"))
    assert problems(text.replace('src = "user:alice"', 'src = "node:alice"'), members=impostor) == [
        "line 6: test failed: node:alice may not reach node:b:22 (tcp)"
    ]


def test_protocols_and_ports() -> None:
    p = pol.parse('[[rules]]\nsrc = ["*"]\ndst = ["node:b:80,8000-8100"]\n')
    assert pol.allowed(p, A, B, "tcp", 80) and pol.allowed(p, A, B, "udp", 8050)
    assert not pol.allowed(p, A, B, "tcp", 81)
    assert not pol.allowed(p, A, B, "icmp", None)  # "any" with ports: tcp and udp only
    p = pol.parse('[[rules]]\nsrc = ["*"]\ndst = ["node:b:*"]\n')
    assert pol.allowed(p, A, B, "icmp", None)


def test_visibility_is_either_direction_and_inbound_is_per_destination() -> None:
    p = pol.parse(
        '[tag_owners]\n"tag:db" = []\n[[rules]]\nsrc = ["node:a"]\ndst = ["tag:db:22"]\nproto = "tcp"\n'
    )
    c = pol.Compiled(p, NODES)
    assert c.visible(1) == {2} and c.visible(2) == {1} and c.visible(3) == frozenset()
    assert c.inbound(2) == (InboundRule(("100.64.0.1/32", "fd7a::1/128"), "tcp", ((22, 22),)),)
    assert c.inbound(1) == () and c.inbound(3) == ()


def test_a_star_source_makes_the_destination_see_everyone() -> None:
    p = pol.parse('[[rules]]\nsrc = ["*"]\ndst = ["node:c:*"]\nproto = "icmp"\n')
    c = pol.Compiled(p, NODES)
    assert c.visible(3) is None and c.visible(1) == {3}
    assert c.inbound(3) == (InboundRule(("0.0.0.0/0", "::/0"), "icmp", ()),)


def test_no_policy_allows_everything() -> None:
    c = pol.Compiled(None, NODES)
    assert c.visible(1) is None and c.inbound(1) == ALLOW_ALL and not c.restricts


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_any_text_is_a_policy_or_a_policy_error(text: str) -> None:
    try:
        pol.check(text, users=set(), members=NODES)
    except PolicyError as err:
        assert err.problems and all(p.startswith("line ") for p in err.problems)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["*", "node:a", "user:alice", "group:eng", "tag:db", "backup", "100.64.0.0/24"]),
            st.sampled_from(["*", "node:b", "node:c", "tag:db", "backup", "user:bob"]),
            st.sampled_from(["22", "*", "1-1024"]),
            st.sampled_from(["tcp", "udp", "any"]),
        ),
        max_size=4,
    )
)
def test_any_node_listed_for_an_inbound_rule_can_see_the_destination(
    rules: list[tuple[str, str, str, str]],
) -> None:
    text = '[groups]\neng = ["alice"]\n[tag_owners]\n"tag:db" = []\n[hosts]\nbackup = "100.64.0.3"\n'
    for src, dst, port, proto in rules:
        text += f'[[rules]]\nsrc = ["{src}"]\ndst = ["{dst}:{port}"]\nproto = "{proto}"\n'
    p = pol.parse(text)
    c = pol.Compiled(p, NODES)
    for dst in NODES:
        for src in NODES:
            if src is dst:
                continue
            may = pol.allowed(p, src, dst, "tcp", 22) or pol.allowed(p, src, dst, "udp", 22)
            sees = c.visible(src.node_id)
            if may:
                assert sees is None or dst.node_id in sees
                assert c.visible(dst.node_id) is None or src.node_id in c.visible(dst.node_id)  # type: ignore[operator]
                srcs = {s for r in c.inbound(dst.node_id) for s in r.sources}
                assert "100.64.0.0/24" in srcs or "0.0.0.0/0" in srcs or f"100.64.0.{src.node_id}/32" in srcs


def test_a_stored_policy_from_before_user_and_node_selectors_keeps_working_without_node_name_grants() -> None:
    """An upgrade must not deny all: a stored bare name is read as user:NAME, never as a node's name."""
    old = '[groups]\neng = ["alice"]\n\n[[rules]]\nsrc = ["alice"]\ndst = ["bob:22"]\nproto = "tcp"\n'
    with pytest.raises(PolicyError, match="ambiguous"):
        pol.parse(old)  # `policy set` refuses it
    parsed, legacy = pol.parse_stored(old)
    assert legacy
    laptop, bob_pc = member(1, "alice-laptop", "alice"), member(2, "bob-pc", "bob")
    impostor = member(3, "alice", "mallory")  # mallory's node, named alice
    assert pol.allowed(parsed, laptop, bob_pc, "tcp", 22)
    assert not pol.allowed(parsed, impostor, bob_pc, "tcp", 22)
    assert pol.parse_stored('[[rules]]\nsrc = ["user:alice"]\ndst = ["*:*"]\n')[1] is False
