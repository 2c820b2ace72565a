"""NAT-PMP / PCP codecs against hand-built RFC layouts; any bytes raise only PortMapError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import natpmp


def test_natpmp_requests_match_rfc6886_layout() -> None:
    assert natpmp.natpmp_external_address_request() == b"\x00\x00"
    req = natpmp.natpmp_map_request(natpmp.Proto.UDP, 41641, 41641, 7200)
    assert req == bytes.fromhex("0001 0000 a2a9 a2a9 00001c20")
    assert len(natpmp.natpmp_map_request(natpmp.Proto.TCP, 1, 0, 0)) == 12


def test_natpmp_responses() -> None:
    addr = natpmp.decode_response(bytes.fromhex("0080 0000 00000064 06000001"))
    assert addr == natpmp.ExternalAddress(0, 100, "6.0.0.1")
    m = natpmp.decode_response(bytes.fromhex("0081 0000 00000065 a2a9 c350 00001c20"))
    assert isinstance(m, natpmp.Mapping) and m.ok
    assert (m.protocol, m.proto, m.internal_port, m.external_port, m.lifetime, m.epoch) == (
        "natpmp",
        natpmp.Proto.UDP,
        41641,
        50000,
        7200,
        101,
    )
    refused = natpmp.decode_response(bytes.fromhex("0081 0002 00000065"))
    assert isinstance(refused, natpmp.Mapping) and refused.result == natpmp.NatPmpResult.NOT_AUTHORIZED


def test_pcp_map_request_and_response() -> None:
    nonce = bytes(range(12))
    req = natpmp.pcp_map_request("192.168.1.2", nonce, natpmp.Proto.UDP, 41641, 7200)
    assert len(req) == 60 and req[:2] == b"\x02\x01"
    assert req[8:24] == bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 2])
    assert req[24:36] == nonce and req[36] == 17
    resp = bytearray(req)
    resp[1] |= 0x80
    resp[3] = 0  # result SUCCESS
    struct.pack_into("!II", resp, 4, 3600, 42)  # granted lifetime, epoch
    resp[12:24] = bytes(12)  # reserved in responses (RFC 6887 §7.2)
    struct.pack_into("!H", resp, 42, 50001)
    resp[44:60] = bytes(10) + b"\xff\xff" + bytes([6, 0, 0, 1])
    m = natpmp.decode_response(bytes(resp))
    assert isinstance(m, natpmp.Mapping) and m.ok
    assert (m.protocol, m.external_ip, m.external_port, m.internal_port, m.lifetime, m.epoch, m.nonce) == (
        "pcp",
        "6.0.0.1",
        50001,
        41641,
        3600,
        42,
        nonce,
    )


def test_pcp_request_is_not_a_response() -> None:
    req = natpmp.pcp_map_request("10.0.0.2", bytes(12), natpmp.Proto.UDP, 1, 1)
    with pytest.raises(natpmp.PortMapError, match="R bit clear"):
        natpmp.decode_response(req)


def test_epoch_detects_router_restart() -> None:
    assert not natpmp.epoch_says_restarted(1000, 50.0, 1100, 150.0)
    assert natpmp.epoch_says_restarted(1000, 50.0, 5, 150.0)  # went backwards
    assert natpmp.epoch_says_restarted(1000, 50.0, 1010, 1050.0)  # ran far slower than our clock


@given(st.binary(max_size=200))
def test_any_bytes_raise_only_portmap_error(data: bytes) -> None:
    with contextlib.suppress(natpmp.PortMapError):
        natpmp.decode_response(data)
