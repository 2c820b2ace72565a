"""Peer-relay signals (meshd/proto/peerrelay.py) and the coordinator-assigned allocations they carry
(relayport.Allocations.assign, PortClient with a peer relay's grants), issue 14."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from meshd.proto import peerrelay, relayport
from meshd.proto.relayport import Allocations, Assigned, PortClient, PortFlags, Refused

KEY = SigningKey(b"\x05" * 32)
TRUSTED = [bytes(KEY.verify_key)]
A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
NOW = 1_700_000_000.0

BODIES: list[peerrelay.Body] = [
    peerrelay.Use(B, 7, "hop", "203.0.113.7", 41800, b"s" * 16, NOW),
    peerrelay.Drop(B, NOW),
    peerrelay.Serve(Assigned(A, 1, 41800, b"a" * 16), Assigned(B, 2, 41801, b"b" * 16), NOW),
    peerrelay.Stop(A, B, NOW),
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_every_body_round_trips_signed_for_its_node(body: peerrelay.Body) -> None:
    payload = peerrelay.encode(body, 9, KEY)
    assert peerrelay.decode(payload, 9, TRUSTED, NOW + 1) == body
    with pytest.raises(peerrelay.PeerRelayError, match="does not verify"):
        peerrelay.decode(payload, 10, TRUSTED, NOW)
    with pytest.raises(peerrelay.PeerRelayError, match="unknown key"):
        peerrelay.decode(payload, 9, [b"\x01" * 32], NOW)
    with pytest.raises(peerrelay.PeerRelayError, match="more than"):
        peerrelay.decode(payload, 9, TRUSTED, NOW + peerrelay.MAX_AGE + 1)


def test_bad_bodies_say_what_is_wrong() -> None:
    good = peerrelay.body_to_json(BODIES[0])
    for change, words in (
        ({"addr": "hop.example"}, "not an IP address"),
        ({"port": 0}, "port 0"),
        ({"secret": "c2hvcnQ="}, "secret"),
        ({"kind": "teleport"}, "unknown kind"),
        ({"name": ""}, "name"),
        ({"relay": True}, "relay must be int"),
    ):
        with pytest.raises(peerrelay.PeerRelayError, match=words):
            peerrelay.body_from_json({**good, **change})
    serve = peerrelay.body_to_json(BODIES[2])
    serve["b"] = dict(serve["a"])
    with pytest.raises(peerrelay.PeerRelayError, match="must differ"):
        peerrelay.body_from_json(serve)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=20,
)


@given(_json)
def test_any_payload_raises_nothing_but_peer_relay_error(value: Any) -> None:
    for payload in (value, {"type": "peer_relay", "key": "0" * 16, "sig": "x", "body": value}):
        with contextlib.suppress(peerrelay.PeerRelayError):
            peerrelay.decode(payload, 9, TRUSTED, NOW)
        with contextlib.suppress(peerrelay.PeerRelayError):
            peerrelay.body_from_json(value)
        with contextlib.suppress(peerrelay.PeerRelayError):
            peerrelay.decode_state(value)


@given(
    st.sampled_from(BODIES),
    st.dictionaries(
        st.sampled_from(["kind", "peer", "a", "b", "port", "at", "addr", "secret", "relay", "name"]),
        _json,
        max_size=3,
    ),
)
def test_mutated_bodies_raise_nothing_but_peer_relay_error(
    body: peerrelay.Body, change: dict[str, Any]
) -> None:
    with contextlib.suppress(peerrelay.PeerRelayError):
        peerrelay.body_from_json({**peerrelay.body_to_json(body), **change})


def test_state_signals_round_trip() -> None:
    assert peerrelay.decode_state(peerrelay.state_payload(B, PortFlags.READY)) == (B, PortFlags.READY)
    with pytest.raises(peerrelay.PeerRelayError):
        peerrelay.decode_state({"type": peerrelay.STATE_TYPE, "peer": "AAAA", "flags": 3})


# -- the relay's core, driven by the coordinator ----------------------------------------------------------
def _side(key: bytes, node: int, port: int, secret: bytes = b"s" * 16) -> Assigned:
    return Assigned(key, node, port, secret)


def test_an_assignment_opens_a_pair_and_the_same_one_again_changes_nothing() -> None:
    allocs = Allocations(range(41800, 41810))
    allocs.assign(_side(A, 1, 41800), _side(B, 2, 41801), 0.0)
    (ev,) = allocs.events()
    assert isinstance(ev, relayport.Opened)
    good = relayport.encode_bind(b"s" * 16, 41800, 5)
    assert allocs.bind(41800, ("192.0.2.1", 5000), good, 1.0)
    allocs.events()
    allocs.assign(_side(A, 1, 41800), _side(B, 2, 41801), 2.0)  # re-sent: the counter stays
    assert allocs.events() == []
    assert not allocs.bind(41800, ("192.0.2.9", 5000), good, 3.0)  # a replay is still refused


def test_a_new_assignment_replaces_the_pair_and_whatever_held_its_ports() -> None:
    allocs = Allocations(range(41800, 41810))
    allocs.assign(_side(A, 1, 41800), _side(B, 2, 41801), 0.0)
    allocs.assign(_side(A, 1, 41802), _side(C, 3, 41803), 0.0)
    allocs.events()
    allocs.assign(_side(B, 2, 41802), _side(C, 3, 41804), 1.0)  # C's pair with A loses port 41802
    ended = {ev.reason for ev in allocs.events() if isinstance(ev, relayport.Ended)}
    assert ended == {"port reassigned"}
    assert set(allocs.by_pair) == {frozenset((A, B)), frozenset((B, C))}
    allocs.unassign(B, A, "withdrawn")
    assert set(allocs.by_pair) == {frozenset((B, C))}


def test_assignments_outside_the_range_or_past_the_caps_are_refused() -> None:
    allocs = Allocations(range(41800, 41810), per_node=1)
    with pytest.raises(Refused, match="range"):
        allocs.assign(_side(A, 1, 40000), _side(B, 2, 41801), 0.0)
    with pytest.raises(Refused):
        allocs.assign(_side(A, 1, 41800), _side(A, 1, 41801), 0.0)
    allocs.assign(_side(A, 1, 41800), _side(B, 2, 41801), 0.0)
    with pytest.raises(Refused, match="may hold 1"):
        allocs.assign(_side(A, 1, 41802), _side(C, 3, 41803), 0.0)


def test_an_idle_assigned_pair_expires() -> None:
    allocs = Allocations(range(41800, 41810), idle=60.0)
    allocs.assign(_side(A, 1, 41800), _side(B, 2, 41801), 0.0)
    allocs.expire(59.0)
    assert allocs.by_pair
    allocs.expire(61.0)
    assert not allocs.by_pair


# -- the node's client with a peer relay's grants -------------------------------------------------------
def test_a_re_sent_grant_keeps_binding_and_a_restart_binds_above_the_old_counter() -> None:
    grant = relayport.Grant(B, 41800, os.urandom(16), 60)
    clock = [1000]
    c = PortClient(counter_base=lambda: clock[0])
    c.want(B, True, 0.0)
    c.granted(grant, 0.0)
    first = [e for e in c.events() if isinstance(e, relayport.SendBind)]
    assert relayport.decode_bind(first[-1].data).counter == 1001
    c.state(B, PortFlags.READY, 0.1)
    assert [e for e in c.events() if isinstance(e, relayport.Moved)] == [relayport.Moved(B, 41800)]
    c.granted(grant, 1.0)  # the same grant re-sent: still ready, no new bind sequence
    assert c.port(B) == 41800 and c.events() == []
    clock[0] = 5000  # a restarted meshd: its first bind is above anything it sent before
    c2 = PortClient(counter_base=lambda: clock[0])
    c2.want(B, True, 0.0)
    c2.granted(grant, 0.0)
    binds = [e for e in c2.events() if isinstance(e, relayport.SendBind)]
    assert relayport.decode_bind(binds[-1].data).counter == 5001


def test_sign_time_is_wall_clock() -> None:
    payload = peerrelay.encode(peerrelay.Drop(B, time.time()), 9, KEY)
    assert isinstance(peerrelay.decode(payload, 9, TRUSTED, time.time()), peerrelay.Drop)
