"""Finding the UPnP gateway (meshd.nat.upnp.find_location / Igd.discover): a fake gateway on loopback
answers our SSDP search; the first valid answer ends the search, a lost request is sent again, an answer
pointing elsewhere is not taken, and without an answer miniupnpc's own discovery runs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from meshd.nat import upnp
from meshd.proto import ssdp


class FakeGateway:
    """Answers M-SEARCHes on 127.0.0.1 with ``reply(n)`` for the n-th request (None: stays silent)."""

    def __init__(self, reply: Callable[[int], bytes | None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.requests: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                data, src = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            self.requests.append(data)
            out = self.reply(len(self.requests))
            if out is not None:
                self.sock.sendto(out, src)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def answer(location: str) -> bytes:
    st = ssdp.TARGETS[0]
    return f"HTTP/1.1 200 OK\r\nST: {st}\r\nLOCATION: {location}\r\n\r\n".encode()


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeGateway]]:
    made: list[FakeGateway] = []

    def make(reply: Callable[[int], bytes | None]) -> FakeGateway:
        gw = FakeGateway(reply)
        monkeypatch.setattr(ssdp, "PORT", gw.port)  # the unicast search goes to the fake
        monkeypatch.setattr(ssdp, "MULTICAST", ("127.0.0.1", gw.port))  # no multicast off this machine
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


def test_the_first_valid_answer_ends_the_search(gateway: Callable[..., FakeGateway]) -> None:
    gw = gateway(lambda n: answer("http://127.0.0.1:5000/rootDesc.xml"))
    t = time.monotonic()
    assert upnp.find_location("127.0.0.1", within=2.0) == "http://127.0.0.1:5000/rootDesc.xml"
    assert time.monotonic() - t < 1.0, "it does not wait out the window"
    assert gw.requests[0].startswith(b"M-SEARCH * HTTP/1.1\r\n")


def test_a_lost_request_is_sent_again_half_way(gateway: Callable[..., FakeGateway]) -> None:
    sent_first = 2 * len(ssdp.TARGETS)  # multicast and unicast (both reach the fake here)
    gw = gateway(lambda n: answer("http://127.0.0.1:5000/d.xml") if n > sent_first else None)
    assert upnp.find_location("127.0.0.1", within=0.6) == "http://127.0.0.1:5000/d.xml"
    assert len(gw.requests) > sent_first


def test_an_answer_naming_another_host_is_not_taken(gateway: Callable[..., FakeGateway]) -> None:
    gateway(lambda n: answer("http://192.0.2.7:5000/rootDesc.xml"))
    assert upnp.find_location("127.0.0.1", within=0.3) is None


def test_no_answer_means_none_after_the_window(gateway: Callable[..., FakeGateway]) -> None:
    gateway(lambda n: None)
    t = time.monotonic()
    assert upnp.find_location("127.0.0.1", within=0.3) is None
    assert 0.29 <= time.monotonic() - t < 1.0


def test_discovery_falls_back_to_miniupnpc_when_our_search_finds_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(upnp, "find_location", lambda gw, within: None)
    monkeypatch.setattr(upnp, "_client", lambda ms: calls.append("miniupnpc") or "client")
    assert upnp.Igd.discover(gateway="192.168.1.1")._u == "client"
    assert calls == ["miniupnpc"]


def test_a_found_device_that_is_no_gateway_falls_back_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_an_igd(location: str) -> object:
        raise upnp.UpnpError("no UPnP IGD: not one")

    monkeypatch.setattr(upnp, "find_location", lambda gw, within: "http://192.168.1.1:1/d.xml")
    monkeypatch.setattr(upnp, "_client_at", not_an_igd)
    monkeypatch.setattr(upnp, "_client", lambda ms: "fallback")
    assert upnp.Igd.discover(gateway="192.168.1.1")._u == "fallback"
