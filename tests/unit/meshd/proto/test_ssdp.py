"""SSDP search for the gateway (meshd/proto/ssdp.py): what we send, and which answers we take."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.proto import ssdp

#: miniupnpd 2.3.1's answer, as the lab's upnp router sent it
MINIUPNPD = (
    b"HTTP/1.1 200 OK\r\n"
    b"CACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:f69934ee-4262-4599-8095-e8ba382e2f4d::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"EXT:\r\n"
    b"SERVER: Debian/6.18.44-fc-v1098 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"LOCATION: http://192.168.1.1:40675/rootDesc.xml\r\n"
    b'OPT: "http://schemas.upnp.org/upnp/1/0/"; ns=01\r\n'
    b"01-NLS: 1796223485\r\n"
    b"\r\n"
)


def answer(st_: str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1", location: str = "") -> bytes:
    location = location or "http://192.168.1.1:5000/desc.xml"
    return f"HTTP/1.1 200 OK\r\nST: {st_}\r\nLocation: {location}\r\n\r\n".encode()


def test_the_search_is_an_m_search_for_the_target() -> None:
    req = ssdp.search(ssdp.TARGETS[0])
    assert req.startswith(b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n")
    assert b'MAN: "ssdp:discover"\r\n' in req and b"MX: 1\r\n" in req
    assert req.endswith(b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n")


@pytest.mark.parametrize("target", ["a\r\nMAN: x", "a\nb"])
def test_a_target_cannot_add_header_lines(target: str) -> None:
    with pytest.raises(ValueError, match="one line"):
        ssdp.search(target)


def test_miniupnpds_answer_gives_its_description_url() -> None:
    got = ssdp.parse_answer(MINIUPNPD, "192.168.1.1")
    assert got == ssdp.Answer(
        "http://192.168.1.1:40675/rootDesc.xml", "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
    )


@pytest.mark.parametrize(
    "target",
    [
        "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
        "urn:schemas-upnp-org:service:WANIPConnection:1",
        "urn:schemas-upnp-org:service:WANPPPConnection:1",
    ],
)
def test_other_gateway_targets_are_taken(target: str) -> None:
    assert ssdp.parse_answer(answer(target), "192.168.1.1") is not None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (answer(location="http://10.9.9.9:5000/desc.xml"), "the description on another host"),
        (answer(location="http://evil.example:5000/desc.xml"), "a host name"),
        (answer(location="https://192.168.1.1:5000/desc.xml"), "not plain http (miniupnpc speaks http)"),
        (answer(location="http://192.168.1.1:0/desc.xml"), "port 0"),
        (answer(location="http://192.168.1.1:99999/desc.xml"), "no such port"),
        (answer("urn:schemas-upnp-org:device:MediaRenderer:1"), "not a gateway"),
        (answer().replace(b"200 OK", b"404 Not Found"), "not a 200"),
        (answer().replace(b"HTTP/1.1", b"NOTIFY * HTTP/1.1"), "a notification, not an answer"),
        (answer().replace(b"Location", b"X-Location"), "no location"),
        (answer() + b"x" * ssdp.MAX_ANSWER, "too large"),
        (answer().replace(b"OK", b"\xff"), "not ASCII"),
        (b"", "empty"),
    ],
)
def test_anything_else_is_ignored(data: bytes, why: str) -> None:
    assert ssdp.parse_answer(data, "192.168.1.1") is None, why


def test_the_first_location_header_counts() -> None:
    data = answer().replace(b"\r\n\r\n", b"\r\nLOCATION: http://10.9.9.9/x\r\n\r\n")
    got = ssdp.parse_answer(data, "192.168.1.1")
    assert got is not None and got.location == "http://192.168.1.1:5000/desc.xml"


def test_an_ipv6_answer_must_come_from_its_location_too() -> None:
    data = answer(location="http://[2001:db8::1]:5000/d.xml")
    assert ssdp.parse_answer(data, "2001:db8::1") is not None
    assert ssdp.parse_answer(data, "2001:db8::2") is None


@given(st.binary(max_size=300), st.sampled_from(["192.168.1.1", "2001:db8::1", "not an address"]))
def test_any_bytes_give_an_answer_or_none(data: bytes, source: str) -> None:
    got = ssdp.parse_answer(data, source)
    assert got is None or got.location.startswith("http://")


@given(
    st.text(max_size=40),
    st.text(max_size=60),
    st.sampled_from(["192.168.1.1", "::1", "x"]),
)
def test_any_headers_give_an_answer_on_the_source_or_none(target: str, location: str, source: str) -> None:
    data = f"HTTP/1.1 200 OK\r\nST: {target}\r\nLOCATION: {location}\r\n\r\n".encode(errors="replace")
    got = ssdp.parse_answer(data, source)
    if got is not None:
        assert got.location.startswith("http://") and source in got.location
        assert got.target.startswith("urn:schemas-upnp-org:")
