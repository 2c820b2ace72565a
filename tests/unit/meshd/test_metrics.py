"""meshd's Prometheus collector: samples in, exposition text out (parsed back with prometheus_client)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshd.metrics import (
    MeshdCollector,
    MetricsListenError,
    MetricsServer,
    PeerSample,
    RelaySample,
    Sample,
    parse_listen,
)


def scrape(collector: MeshdCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text parsed back: (sample name, sorted labels) -> value."""
    reg = CollectorRegistry()
    reg.register(collector)
    text = generate_latest(reg).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def peer(name: str, path: str, rx: int, tx: int, **kw: float | None) -> PeerSample:
    return PeerSample(name=name, path=path, rx_bytes=rx, tx_bytes=tx, **kw)


def test_peers_by_path_counts_every_path_even_when_zero() -> None:
    c = MeshdCollector()
    c.observe(Sample(peers=(peer("a", "direct", 0, 0), peer("b", "direct", 0, 0), peer("c", "relay", 0, 0))))
    m = scrape(c)
    assert m["meshd_peers", (("path", "direct"),)] == 2
    assert m["meshd_peers", (("path", "relay"),)] == 1
    assert m["meshd_peers", (("path", "none"),)] == 0


def test_per_peer_counters_gauges_and_units() -> None:
    c = MeshdCollector()
    c.observe(Sample(peers=(peer("a", "direct", 100, 200, handshake_age=12.5, probe_rtt=0.004),)))
    m = scrape(c)
    assert m["meshd_peer_receive_bytes_total", (("peer", "a"),)] == 100
    assert m["meshd_peer_transmit_bytes_total", (("peer", "a"),)] == 200
    assert m["meshd_peer_handshake_age_seconds", (("peer", "a"),)] == 12.5
    assert m["meshd_peer_probe_rtt_seconds", (("peer", "a"),)] == 0.004


def test_a_peer_without_handshake_or_probe_has_no_such_series() -> None:
    c = MeshdCollector()
    c.observe(Sample(peers=(peer("a", "relay", 1, 1),)))
    names = {n for n, _ in scrape(c)}
    assert "meshd_peer_handshake_age_seconds" not in names
    assert "meshd_peer_probe_rtt_seconds" not in names


def test_bytes_go_to_the_path_the_peer_was_on_when_sampled() -> None:
    c = MeshdCollector()
    c.observe(Sample(peers=(peer("a", "relay", 1000, 500),)))
    c.observe(Sample(peers=(peer("a", "direct", 1600, 700),)))  # moved to direct: 600/200 more
    m = scrape(c)
    assert m["meshd_path_receive_bytes_total", (("path", "relay"),)] == 1000
    assert m["meshd_path_transmit_bytes_total", (("path", "relay"),)] == 500
    assert m["meshd_path_receive_bytes_total", (("path", "direct"),)] == 600
    assert m["meshd_path_transmit_bytes_total", (("path", "direct"),)] == 200


def test_a_reset_peer_counter_never_makes_a_path_counter_go_down() -> None:
    c = MeshdCollector()
    c.observe(Sample(peers=(peer("a", "direct", 5000, 5000),)))
    c.observe(Sample(peers=(peer("a", "direct", 300, 100),)))  # key rotated: WireGuard starts from 0
    m = scrape(c)
    assert m["meshd_path_receive_bytes_total", (("path", "direct"),)] == 5300
    assert m["meshd_path_transmit_bytes_total", (("path", "direct"),)] == 5100


def test_a_peer_that_left_is_forgotten_and_counted_afresh_when_back() -> None:
    c = MeshdCollector()
    c.observe(Sample(peers=(peer("a", "direct", 100, 0),)))
    c.observe(Sample(peers=()))
    assert not any(n.startswith("meshd_peer_receive") for n, _ in scrape(c))
    c.observe(Sample(peers=(peer("a", "direct", 40, 0),)))
    assert scrape(c)["meshd_path_receive_bytes_total", (("path", "direct"),)] == 140


@settings(deadline=None)  # a loaded CI machine must not fail a property on time
@given(hs.lists(hs.tuples(hs.sampled_from(["direct", "relay", "none"]), hs.integers(0, 2**40)), max_size=20))
def test_path_counters_are_monotonic(steps: list[tuple[str, int]]) -> None:
    c = MeshdCollector()
    before = 0.0
    for path, rx in steps:
        c.observe(Sample(peers=(peer("a", path, rx, 0),)))
        total = sum(
            s.value for fam in c.collect() if fam.name == "meshd_path_receive_bytes" for s in fam.samples
        )
        assert total >= before
        before = total


def test_relay_portmap_coordinator_and_map_version() -> None:
    c = MeshdCollector()
    c.observe(
        Sample(
            coordinator_connected=True,
            relays=(RelaySample("fra", True, 2), RelaySample("nyc", False, 0)),
            portmap="pcp",
            portmap_lease=3599.5,
            map_version=41,
            map_received=43,
        )
    )
    m = scrape(c)
    assert m["meshd_relay_connected", (("region", "fra"),)] == 1
    assert m["meshd_relay_connected", (("region", "nyc"),)] == 0
    assert m["meshd_relay_reconnects_total", (("region", "fra"),)] == 2
    assert m["meshd_portmap_active", (("protocol", "pcp"),)] == 1
    assert m["meshd_portmap_active", (("protocol", "upnp"),)] == 0
    assert m["meshd_portmap_lease_remaining_seconds", ()] == 3599.5
    assert m["meshd_coordinator_connected", ()] == 1
    assert m["meshd_map_version", ()] == 41
    assert m["meshd_map_version_lag", ()] == 2


def test_no_port_map_no_lease_and_no_map_no_version() -> None:
    c = MeshdCollector()
    c.observe(Sample())
    names = {n for n, _ in scrape(c)}
    assert "meshd_portmap_lease_remaining_seconds" not in names
    assert "meshd_map_version" not in names
    assert "meshd_coordinator_connected" in names


def test_labels_hold_names_only() -> None:
    """No keys, no addresses: the only label names are peer, path, region and protocol."""
    c = MeshdCollector()
    c.observe(
        Sample(
            peers=(peer("a", "direct", 1, 1, handshake_age=1.0, probe_rtt=0.001),),
            relays=(RelaySample("fra", True),),
            portmap="upnp",
            portmap_lease=10.0,
        )
    )
    labels = {k for _, ls in scrape(c) for k, _ in ls}
    assert labels == {"peer", "path", "region", "protocol"}


@pytest.mark.parametrize(
    ("text", "want"),
    [("127.0.0.1:9101", ("127.0.0.1", 9101)), ("[::1]:0", ("::1", 0)), ("localhost:80", ("localhost", 80))],
)
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize(
    "text", ["9101", ":9101", "127.0.0.1", "127.0.0.1:99999", "a:b", "x@h:1", "h:1/p", ""]
)
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(MetricsListenError, match="expected HOST:PORT"):
        parse_listen(text)


@given(hs.text(max_size=40))
def test_parse_listen_never_raises_anything_else(text: str) -> None:
    try:
        host, port = parse_listen(text)
    except MetricsListenError:
        return
    assert host and 0 <= port <= 65535


async def _http(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_the_listener_answers_other_paths_methods_and_garbage_without_sampling() -> None:
    srv = MetricsServer(None, "127.0.0.1", 0)  # type: ignore[arg-type]  # these requests never sample
    await srv.start()
    try:
        assert (await _http(srv.port, b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _http(srv.port, b"POST /metrics HTTP/1.1\r\nhost: a\r\n\r\n")).startswith(
            b"HTTP/1.1 405"
        )
        assert await _http(srv.port, b"\x16\x03\x01 not http\r\n\r\n") == b""
    finally:
        await srv.close()
