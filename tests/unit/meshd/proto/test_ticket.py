"""Relay tickets: issue/verify, expiry, wrong key, tampering; any input raises only TicketError."""

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


def test_fresh_ticket_verifies_and_names_the_key() -> None:
    t = ticket.make(5, WG, SEED, now=1000.0)
    p = ticket.verify(t, [PUB], 1000.0)
    assert p.node_id == 5 and p.key == bytes(32 * [7])
    assert p.not_after - 1000 == ticket.TICKET_LIFETIME


def test_expired_ticket_refused() -> None:
    t = ticket.make(5, WG, SEED, now=1000.0)
    with pytest.raises(ticket.TicketError, match="expired"):
        ticket.verify(t, [PUB], 1000.0 + ticket.TICKET_LIFETIME)


def test_ticket_from_another_coordinator_refused() -> None:
    t = ticket.make(5, WG, bytes(32 * [9]), now=1000.0)
    with pytest.raises(ticket.TicketError, match="unknown issuer"):
        ticket.verify(t, [PUB], 1000.0)


def test_tampered_payload_has_bad_signature() -> None:
    t = ticket.make(5, WG, SEED, now=1000.0)
    _body, sig = t.split(".")
    _payload, _raw, _ = ticket.decode(t)
    other = ticket.make(6, WG, SEED, now=1000.0).split(".")[0]
    with pytest.raises(ticket.TicketError, match="bad signature"):
        ticket.verify(f"{other}.{sig}", [PUB], 1000.0)


def test_ticket_rides_in_the_client_hello() -> None:
    t = ticket.make(5, WG, SEED, now=1000.0).encode()
    [frame] = relay.FrameDecoder().feed(relay.client_hello(bytes(32 * [7]), t, home=False))
    hello = relay.parse_hello(frame)
    assert hello.key == bytes(32 * [7]) and not hello.home
    assert ticket.verify(hello.ticket, [PUB], 1000.0).node_id == 5


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_input_raises_only_ticket_error(data: str | bytes) -> None:
    with contextlib.suppress(ticket.TicketError):
        ticket.verify(data, [PUB], 1000.0)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEF0123456789-_.", max_size=200))
def test_base64url_garbage_raises_only_ticket_error(data: str) -> None:
    with contextlib.suppress(ticket.TicketError):
        ticket.verify(data, [PUB], 1000.0)
