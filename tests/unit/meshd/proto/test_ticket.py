"""Relay tickets: issue/verify, expiry, wrong key, tampering, the node key and region they name; any input
raises only TicketError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from meshd.proto import relay, ticket
from meshd.proto.encoding import b64encode

SEED = bytes(range(32))
PUB = bytes(SigningKey(SEED).verify_key)
WG = b64encode(bytes(32 * [7]))
NODE_SEED = bytes(32 * [3])
NODE = b64encode(bytes(SigningKey(NODE_SEED).verify_key))


def make(node_id: int = 5, signing_key: bytes = SEED, region_id: int = 1) -> str:
    return ticket.make(node_id, NODE, WG, region_id, signing_key, now=1000.0)


def test_fresh_ticket_verifies_and_names_the_key() -> None:
    t = make(region_id=2)
    p = ticket.verify(t, [PUB], 1000.0)
    assert p.node_id == 5 and p.key == bytes(32 * [7]) and p.region_id == 2
    assert p.node_key == bytes(SigningKey(NODE_SEED).verify_key)
    assert p.not_after - 1000 == ticket.TICKET_LIFETIME


def test_expired_ticket_refused() -> None:
    t = make()
    with pytest.raises(ticket.TicketError, match="expired"):
        ticket.verify(t, [PUB], 1000.0 + ticket.TICKET_LIFETIME)


def test_ticket_from_another_coordinator_refused() -> None:
    t = make(signing_key=bytes(32 * [9]))
    with pytest.raises(ticket.TicketError, match="unknown issuer"):
        ticket.verify(t, [PUB], 1000.0)


def test_tampered_payload_has_bad_signature() -> None:
    t = make()
    _body, sig = t.split(".")
    for other in (make(node_id=6), make(region_id=2)):
        with pytest.raises(ticket.TicketError, match="bad signature"):
            ticket.verify(f"{other.split('.')[0]}.{sig}", [PUB], 1000.0)


def test_ticket_rides_in_the_client_hello_signed_by_its_node_key() -> None:
    t = make().encode()
    ch = relay.Challenge(1, bytes(32))
    sig = relay.sign_hello(NODE_SEED, ch, bytes(32 * [7]), False, t)
    [frame] = relay.FrameDecoder().feed(relay.client_hello(bytes(32 * [7]), t, sig, home=False))
    hello = relay.parse_hello(frame)
    assert hello.key == bytes(32 * [7]) and not hello.home
    payload = ticket.verify(hello.ticket, [PUB], 1000.0)
    assert payload.node_id == 5 and relay.hello_signed_by(payload.node_key, ch, hello)


def test_a_grant_never_shows_its_ticket() -> None:
    g = ticket.Grant(make(), 1300.0, lambda m: bytes(64))
    assert make() not in repr(g) and "1300" in repr(g)


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_input_raises_only_ticket_error(data: str | bytes) -> None:
    with contextlib.suppress(ticket.TicketError):
        ticket.verify(data, [PUB], 1000.0)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEF0123456789-_.", max_size=200))
def test_base64url_garbage_raises_only_ticket_error(data: str) -> None:
    with contextlib.suppress(ticket.TicketError):
        ticket.verify(data, [PUB], 1000.0)
