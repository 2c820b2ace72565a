"""Path probes: only the addressed peer opens them, tampering is caught, any bytes raise DiscoError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from meshd.proto import disco, stun

A = disco.DiscoKeys(bytes(SigningKey.generate()))
B = disco.DiscoKeys(bytes(SigningKey.generate()))
C = disco.DiscoKeys(bytes(SigningKey.generate()))


def test_ping_pong_between_two_nodes() -> None:
    txid = disco.new_txid()
    wire = A.seal(B.public, disco.Ping(txid))
    assert disco.looks_like_disco(wire) and disco.sender_key(wire) == A.public
    assert B.open(wire, A.public) == disco.Ping(txid)
    pong = B.seal(A.public, disco.Pong(txid, ("7.0.0.9", 40000)))
    assert A.open(pong, B.public) == disco.Pong(txid, ("7.0.0.9", 40000))
    v6 = B.seal(A.public, disco.Pong(txid, ("2001:db8::1", 1)))
    assert A.open(v6, B.public) == disco.Pong(txid, ("2001:db8::1", 1))


def test_probes_never_look_like_wireguard_or_stun() -> None:
    wire = A.seal(B.public, disco.Ping(disco.new_txid()))
    assert wire[0] not in (1, 2, 3, 4)
    assert not stun.looks_like_stun(wire)


def test_a_third_node_cannot_open_or_forge() -> None:
    wire = A.seal(B.public, disco.Ping(disco.new_txid()))
    with pytest.raises(disco.DiscoError, match="does not decrypt"):
        C.open(wire, A.public)
    forged = disco.MAGIC + A.public + C.seal(B.public, disco.Ping(disco.new_txid()))[36:]
    with pytest.raises(disco.DiscoError, match="does not decrypt"):
        B.open(forged, A.public)
    with pytest.raises(disco.DiscoError, match="differs"):
        B.open(wire, C.public)


def test_tampered_ciphertext_is_rejected() -> None:
    wire = bytearray(A.seal(B.public, disco.Ping(disco.new_txid())))
    wire[-1] ^= 0x01
    with pytest.raises(disco.DiscoError):
        B.open(bytes(wire), A.public)


@given(st.binary(max_size=300))
def test_any_bytes_raise_only_disco_error(data: bytes) -> None:
    with contextlib.suppress(disco.DiscoError):
        B.open(data, A.public)
    with contextlib.suppress(disco.DiscoError):
        disco.decode_plain(data)


@given(st.binary(min_size=12, max_size=12), st.ip_addresses().map(str), st.integers(0, 65535))
def test_plain_roundtrip(txid: bytes, ip: str, port: int) -> None:
    for msg in (disco.Ping(txid), disco.Pong(txid, (ip, port))):
        assert disco.decode_plain(disco.encode_plain(msg)) == msg
