"""Prometheus metrics of one meshd: ``meshd up --metrics-listen 127.0.0.1:9101`` (off by default).

Three parts, like the rest of meshd:

* :class:`Sample` is what the daemon looked like at one moment (plain values, gathered by :func:`gather`
  from the status document, the relay client, the port mapper and the control session);
* :class:`MeshdCollector` turns samples into metric families (pure: unit tests feed it samples). It keeps
  one piece of state, the bytes per path: WireGuard counts bytes per peer only, so the bytes a peer moved
  since the previous sample are added to the path that peer is on now (a scrape every 15 s attributes a
  path change to within 15 s);
* :class:`MetricsServer` answers ``GET /metrics`` on a TCP port inside the daemon's event loop (h11, no
  thread, no framework), taking a fresh sample for every scrape.

Names follow the Prometheus conventions (base units in the name, ``_total`` for counters). Labels carry
peer names, path kinds, relay region names and port-map protocols, nothing else: no keys, no addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import h11
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from meshd.status import PATHS

if TYPE_CHECKING:
    from meshd.daemon import Daemon

log = logging.getLogger("meshd")

PORTMAP_PROTOCOLS = ("upnp", "natpmp", "pcp")
MAX_REQUEST = 8192  #: a scrape is one small GET; anything bigger is not Prometheus
REQUEST_TIMEOUT = 5.0  #: seconds for a client to send its request (a silent connection is dropped)
SAMPLE_TIMEOUT = 3.0  #: seconds for one sample (the WireGuard backend may be slow to answer)


class MetricsListenError(ValueError):
    """A --metrics-listen value that is not HOST:PORT."""


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:9101`` or ``[::1]:9101`` -> (host, port); the host is required (no silent 0.0.0.0)."""
    try:
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None or parts.path or parts.username is not None:
        raise MetricsListenError(f"--metrics-listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9101")
    return host, port


# --- samples (plain values) ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerSample:
    name: str
    path: str  #: one of meshd.status.PATHS
    rx_bytes: int
    tx_bytes: int
    handshake_age: float | None = None  #: seconds since WireGuard's last handshake; None: never
    probe_rtt: float | None = None  #: seconds, the path machine's last probe round trip


@dataclass(frozen=True, slots=True)
class RelaySample:
    region: str
    connected: bool
    reconnects: int = 0


@dataclass(frozen=True, slots=True)
class Sample:
    peers: tuple[PeerSample, ...] = ()
    coordinator_connected: bool = False
    relays: tuple[RelaySample, ...] = ()
    portmap: str | None = None  #: the port-mapping protocol in use
    portmap_lease: float | None = None  #: seconds left on the port map's lease
    map_version: int | None = None  #: the map version applied to this host
    map_received: int | None = None  #: the newest map version received from the coordinator


# --- the collector (pure) ------------------------------------------------------------------------------


class MeshdCollector(Collector):
    """Metric families from the newest :class:`Sample`; register it on a CollectorRegistry."""

    def __init__(self) -> None:
        self.sample = Sample()
        #: bytes per (path, direction), accumulated from per-peer deltas
        self._path_bytes: dict[tuple[str, str], int] = {(p, d): 0 for p in PATHS for d in ("rx", "tx")}
        self._last: dict[str, tuple[int, int]] = {}  #: peer name -> (rx, tx) at the previous sample

    def observe(self, sample: Sample) -> None:
        """Take a new sample: the peers' byte deltas go to the path each peer is on now."""
        last: dict[str, tuple[int, int]] = {}
        for p in sample.peers:
            prev_rx, prev_tx = self._last.get(p.name, (0, 0))
            # a counter that went down was reset (key rotation, peer re-added): all of it is new
            self._path_bytes[p.path, "rx"] += p.rx_bytes - prev_rx if p.rx_bytes >= prev_rx else p.rx_bytes
            self._path_bytes[p.path, "tx"] += p.tx_bytes - prev_tx if p.tx_bytes >= prev_tx else p.tx_bytes
            last[p.name] = (p.rx_bytes, p.tx_bytes)
        self._last = last  # a peer that left the map is forgotten (its series end with it)
        self.sample = sample

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        s = self.sample
        peers = GaugeMetricFamily("meshd_peers", "Peers by the path their packets take", labels=["path"])
        for kind in PATHS:
            peers.add_metric([kind], sum(1 for p in s.peers if p.path == kind))
        yield peers
        handshake = GaugeMetricFamily(
            "meshd_peer_handshake_age_seconds",
            "Seconds since the last WireGuard handshake with the peer (absent: never)",
            labels=["peer"],
        )
        rtt = GaugeMetricFamily(
            "meshd_peer_probe_rtt_seconds",
            "Round trip of the last path probe answered by the peer (absent: none yet)",
            labels=["peer"],
        )
        rx = CounterMetricFamily(
            "meshd_peer_receive_bytes", "Bytes received from the peer (WireGuard)", labels=["peer"]
        )
        tx = CounterMetricFamily(
            "meshd_peer_transmit_bytes", "Bytes sent to the peer (WireGuard)", labels=["peer"]
        )
        for p in sorted(s.peers, key=lambda p: p.name):
            if p.handshake_age is not None:
                handshake.add_metric([p.name], p.handshake_age)
            if p.probe_rtt is not None:
                rtt.add_metric([p.name], p.probe_rtt)
            rx.add_metric([p.name], p.rx_bytes)
            tx.add_metric([p.name], p.tx_bytes)
        yield from (handshake, rtt, rx, tx)
        for direction, word, verb in (("rx", "receive", "received"), ("tx", "transmit", "sent")):
            fam = CounterMetricFamily(
                f"meshd_path_{word}_bytes",
                f"Bytes {verb} over each path (a peer's bytes count on the path it was on when sampled)",
                labels=["path"],
            )
            for kind in PATHS:
                fam.add_metric([kind], self._path_bytes[kind, direction])
            yield fam
        connected = GaugeMetricFamily(
            "meshd_relay_connected", "1 while the link to the relay region is up", labels=["region"]
        )
        reconnects = CounterMetricFamily(
            "meshd_relay_reconnects",
            "Links to the relay region made again after one was lost",
            labels=["region"],
        )
        for r in sorted(s.relays, key=lambda r: r.region):
            connected.add_metric([r.region], 1 if r.connected else 0)
            reconnects.add_metric([r.region], r.reconnects)
        yield from (connected, reconnects)
        portmap = GaugeMetricFamily(
            "meshd_portmap_active",
            "1 for the port-mapping protocol holding our port map",
            labels=["protocol"],
        )
        for proto in PORTMAP_PROTOCOLS:
            portmap.add_metric([proto], 1 if s.portmap == proto else 0)
        yield portmap
        lease = GaugeMetricFamily(
            "meshd_portmap_lease_remaining_seconds", "Seconds left on the port map's lease (absent: no map)"
        )
        if s.portmap is not None and s.portmap_lease is not None:
            lease.add_metric([], max(0.0, s.portmap_lease))
        yield lease
        yield GaugeMetricFamily(
            "meshd_coordinator_connected",
            "1 while the map stream to the coordinator is open",
            value=1 if s.coordinator_connected else 0,
        )
        version = GaugeMetricFamily("meshd_map_version", "Version of the network map applied to this host")
        lag = GaugeMetricFamily(
            "meshd_map_version_lag",
            "Map versions received from the coordinator but not (yet) applied to this host",
        )
        if s.map_version is not None:
            version.add_metric([], s.map_version)
        if s.map_received is not None:
            lag.add_metric([], max(0, s.map_received - (s.map_version or 0)))
        yield from (version, lag)


# --- the shell: gathering a sample from the running daemon and serving it ------------------------------


async def gather(daemon: Daemon) -> Sample:
    """A sample of the running daemon (its status document plus the counters status does not show)."""
    from meshd.localcmd import LocalCommands  # a fresh one: latency is the probe's, never a `meshd ping`

    status = await LocalCommands(daemon).status()
    now = time.time()
    peers = tuple(
        PeerSample(
            name=p.name,
            path=p.path,
            rx_bytes=p.rx_bytes,
            tx_bytes=p.tx_bytes,
            handshake_age=max(0.0, now - p.last_handshake.timestamp()) if p.last_handshake else None,
            probe_rtt=p.latency_ms / 1000 if p.latency_ms is not None else None,
        )
        for p in status.peers
    )
    relay = daemon.relay
    relays = (
        tuple(RelaySample(r.name, r.connected, relay.reconnects.get(r.id, 0)) for r in relay.status())
        if relay is not None
        else ()
    )
    pm = daemon.portmap
    applied = daemon.applier.map.version if daemon.applier is not None and daemon.applier.map else None
    session = daemon.session
    return Sample(
        peers=peers,
        coordinator_connected=status.coordinator.connected,
        relays=relays,
        portmap=pm.protocol if pm is not None else None,
        portmap_lease=pm.lease_remaining() if pm is not None else None,
        map_version=applied,
        map_received=session.received_version if session is not None else None,
    )


class MetricsServer:
    """``GET /metrics`` (and ``/``) over HTTP/1.1 on one TCP address, served in the daemon's loop."""

    def __init__(self, daemon: Daemon, host: str, port: int) -> None:
        self.daemon = daemon
        self.host, self.port = host, port
        self.collector = MeshdCollector()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self.collector)
        self._server: asyncio.Server | None = None
        self._lock = asyncio.Lock()  #: one sample at a time (the per-path bytes are a running sum)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def render(self) -> bytes:
        async with self._lock:
            async with asyncio.timeout(SAMPLE_TIMEOUT):
                sample = await gather(self.daemon)
            self.collector.observe(sample)
            return generate_latest(self.registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT + SAMPLE_TIMEOUT):
                await self._exchange(reader, writer)
        except (TimeoutError, ConnectionError, h11.ProtocolError):
            pass  # a client that does not speak HTTP, or went away: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        request: h11.Request | None = None
        while request is None:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    conn.receive_data(await reader.read(MAX_REQUEST))
            elif isinstance(event, h11.Request):
                request = event
            else:
                return  # the client closed before asking
        target = request.target.split(b"?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            status, body, ctype = 405, b"only GET\n", b"text/plain"
        elif target not in (b"/metrics", b"/"):
            status, body, ctype = 404, b"try /metrics\n", b"text/plain"
        else:
            try:
                status, body, ctype = 200, await self.render(), CONTENT_TYPE_LATEST.encode()
            except Exception as exc:  # a sample that failed must not take the daemon down
                log.warning("metrics: sampling failed: %s", exc or type(exc).__name__)
                status, body, ctype = 503, b"sampling failed; see the meshd log\n", b"text/plain"
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", ctype),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if request.method != b"HEAD":
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        await writer.drain()
