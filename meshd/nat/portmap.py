"""Time-bound port maps over NAT-PMP (RFC 6886) and PCP (RFC 6887), sans-IO.

One :class:`PortMapper` per WireGuard port. It probes the gateway with both protocols at once using
requests that create nothing (PCP ANNOUNCE, RFC 6887 §14.1; NAT-PMP external address, RFC 6886 §3.2),
then maps with the first protocol that answered (two protocols mapping the same port would replace each
other's mapping inside the router); renews at half of the granted lifetime (RFC 6886 §3.3 recommends
renewing well before expiry; RFC 6887 §11.2.1 between 1/2 and 5/8); re-creates the mapping when the
server's epoch shows it restarted (RFC 6886 §3.6, RFC 6887 §8.5); and deletes it on :meth:`close`.
UPnP IGD is not a UDP protocol of this shape; :mod:`meshd.nat.upnp` drives miniupnpc beside this.

The caller moves datagrams between :meth:`datagrams_to_send` / :meth:`receive` and a UDP socket bound to
any local port (the mapping names the WireGuard port as the internal port), and calls
:meth:`handle_timer` at :meth:`next_timer`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

from meshd.proto import natpmp
from meshd.proto.endpoint import Endpoint

DEFAULT_LIFETIME = 7200
RETRY_INTERVAL = 0.25  # RFC 6886 §3.1: 250 ms, doubling
MAX_TRIES = 4  # ~3.75 s before deciding a protocol is not spoken here
REPROBE_AFTER = 300.0  # when neither protocol answered, ask again later (the router may gain it)


@dataclass(frozen=True, slots=True)
class MapGranted:
    """The gateway maps ``external`` to our internal port until ``expires`` (caller's clock)."""

    protocol: str  #: "natpmp" or "pcp"
    external: Endpoint
    lifetime: int
    expires: float


@dataclass(frozen=True, slots=True)
class MapLost:
    """The mapping is gone (refused, expired unrenewed, or no protocol answered); ``reason`` says which."""

    reason: str


Event = MapGranted | MapLost


class _Phase(Enum):
    PROBING = "probing"
    MAPPED = "mapped"
    IDLE = "idle"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(slots=True)
class _Pending:
    data: bytes
    next_send: float
    interval: float
    tries: int = 0


class PortMapper:
    """NAT-PMP + PCP port mapping for one internal UDP port.

    ``client_ip`` is our LAN address facing the gateway (PCP carries it and the server checks it,
    RFC 6887 §8.1). Protocol labels in events are "natpmp" / "pcp".
    """

    def __init__(
        self,
        gateway: str,
        client_ip: str,
        internal_port: int,
        *,
        lifetime: int = DEFAULT_LIFETIME,
        nonce: bytes | None = None,
    ) -> None:
        self.gateway: Endpoint = (gateway, natpmp.PORT)
        self.client_ip = client_ip
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.nonce = nonce or os.urandom(12)
        self.protocol: str | None = None
        self.external: Endpoint | None = None
        self.spoken: set[str] = set()  #: protocols whose probe the gateway answered ("natpmp", "pcp")
        self.expires: float | None = None
        self._phase = _Phase.IDLE
        self._pending: dict[str, _Pending] = {}
        self._natpmp_ip: str | None = None
        self._epoch: tuple[int, float] | None = None
        self._renew_at: float | None = None
        self._reprobe_at: float | None = None
        self._events: list[Event] = []

    # -- requests ---------------------------------------------------------------------------------------

    def _pcp_request(self, lifetime: int) -> bytes:
        suggested = self.external[1] if self.external else self.internal_port
        return natpmp.pcp_map_request(
            self.client_ip,
            self.nonce,
            natpmp.Proto.UDP,
            self.internal_port,
            lifetime,
            suggested_port=suggested if lifetime else 0,
        )

    def _natpmp_request(self, lifetime: int) -> bytes:
        suggested = self.external[1] if self.external else self.internal_port
        return natpmp.natpmp_map_request(
            natpmp.Proto.UDP, self.internal_port, suggested if lifetime else 0, lifetime
        )

    def _queue(self, key: str, data: bytes, now: float) -> None:
        self._pending[key] = _Pending(data, now, RETRY_INTERVAL)

    def start(self, now: float) -> None:
        """Probe both protocols at once (also used to re-create the mapping after a router restart)."""
        self._phase = _Phase.PROBING
        self._pending.clear()
        self.protocol = None
        self._natpmp_ip = None
        self._reprobe_at = None
        self._queue("pcp-announce", natpmp.pcp_announce_request(self.client_ip), now)
        self._queue("natpmp-addr", natpmp.natpmp_external_address_request(), now)

    def _choose(self, proto: str, now: float) -> None:
        """The first protocol that answered a probe does the mapping; the other is left alone."""
        if self.protocol is not None:
            return
        self.protocol = proto
        self._pending.clear()
        if proto == "pcp":
            self._queue("pcp", self._pcp_request(self.lifetime), now)
        else:
            self._queue("natpmp-map", self._natpmp_request(self.lifetime), now)

    def close(self, now: float) -> None:
        """Delete our mapping (lifetime 0). Send what :meth:`datagrams_to_send` returns, then forget us.

        Also when a map request is still unanswered: the router may grant it after we stopped waiting,
        so a delete follows it (deleting a mapping that does not exist is harmless)."""
        requested = self._phase == _Phase.PROBING and any(k in self._pending for k in ("pcp", "natpmp-map"))
        if (self._phase == _Phase.MAPPED or requested) and self.protocol is not None:
            self._pending.clear()
            if self.protocol == "pcp":
                self._queue("pcp", self._pcp_request(0), now)
            else:
                self._queue("natpmp-map", self._natpmp_request(0), now)
            self._phase = _Phase.CLOSING
        else:
            self._pending.clear()
            self._phase = _Phase.CLOSED
        self._renew_at = self._reprobe_at = None

    @property
    def closed(self) -> bool:
        return self._phase == _Phase.CLOSED

    # -- I/O hooks --------------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out: list[tuple[bytes, Endpoint]] = []
        for p in self._pending.values():
            if p.next_send <= now and p.tries < MAX_TRIES:
                out.append((p.data, self.gateway))
                p.tries += 1
                p.next_send = now + p.interval
                p.interval *= 2
        return out

    def receive(self, data: bytes, src: Endpoint, now: float) -> None:
        if src[0] != self.gateway[0]:
            return  # RFC 6886 §3.1: only the gateway's answers count
        try:
            resp = natpmp.decode_response(data)
        except natpmp.PortMapError:
            return
        if self._check_epoch(resp, now):
            return
        if isinstance(resp, natpmp.Announce):
            self._pending.pop("pcp-announce", None)
            if resp.result == 0:
                self.spoken.add("pcp")
                self._choose("pcp", now)
            return
        if isinstance(resp, natpmp.ExternalAddress):
            self._pending.pop("natpmp-addr", None)
            if resp.result == 0:
                self.spoken.add("natpmp")
                self._natpmp_ip = resp.address
                self._choose("natpmp", now)
            return
        if resp.protocol == "pcp" and resp.nonce != self.nonce:
            return
        if self._phase == _Phase.CLOSING:
            if resp.lifetime == 0 or not resp.ok:  # the answer to our delete
                self._pending.clear()
                self._phase = _Phase.CLOSED
            # else a grant that crossed our delete: the delete stays pending (and is retried)
            return
        self._pending.pop("pcp" if resp.protocol == "pcp" else "natpmp-map", None)
        self._granted_or_refused(resp.protocol, resp, resp.external_ip or self._natpmp_ip, now)

    def _granted_or_refused(
        self, proto: str, resp: natpmp.Mapping, external_ip: str | None, now: float
    ) -> None:
        if proto != self.protocol:
            return  # a late answer of a protocol we did not choose
        if not resp.ok or external_ip is None or resp.lifetime == 0:
            self._lose(f"{proto} refused the mapping (result {resp.result})", now)
            return
        self.protocol = proto
        self.external = (external_ip, resp.external_port)
        self.expires = now + resp.lifetime
        self._renew_at = now + resp.lifetime / 2
        self._phase = _Phase.MAPPED
        self._events.append(MapGranted(proto, self.external, resp.lifetime, self.expires))

    def _check_epoch(self, resp: natpmp.Response, now: float) -> bool:
        """Track the server epoch; on a restart, re-create the mapping at once. True if handled."""
        prev = self._epoch
        self._epoch = (resp.epoch, now)
        if prev is None or self._phase != _Phase.MAPPED:
            return False
        if natpmp.epoch_says_restarted(prev[0], prev[1], resp.epoch, now):
            self.start(now)
            return True
        return False

    def _lose(self, reason: str, now: float) -> None:
        self.protocol = None
        self.external = None
        self.expires = None
        self._renew_at = None
        self._pending.clear()
        self._phase = _Phase.IDLE
        self._reprobe_at = now + REPROBE_AFTER
        self._events.append(MapLost(reason))

    # -- timers -----------------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        times = [p.next_send for p in self._pending.values()]
        for t in (self._renew_at, self._reprobe_at, self.expires):
            if t is not None:
                times.append(t)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        exhausted = [k for k, p in self._pending.items() if p.tries >= MAX_TRIES and p.next_send <= now]
        for k in exhausted:
            del self._pending[k]
        if self._phase == _Phase.CLOSING and not self._pending:
            self._phase = _Phase.CLOSED
            return
        if self._phase == _Phase.PROBING and not self._pending:
            self._lose("no NAT-PMP or PCP answer from the gateway", now)
            return
        if self._phase == _Phase.MAPPED:
            if self.expires is not None and now >= self.expires:
                self._lose("mapping expired before it could be renewed", now)
                return
            if self._renew_at is not None and now >= self._renew_at and not self._pending:
                self._renew_at = None
                key = "pcp" if self.protocol == "pcp" else "natpmp-map"
                data = (
                    self._pcp_request(self.lifetime) if key == "pcp" else self._natpmp_request(self.lifetime)
                )
                self._queue(key, data, now)
            elif self._renew_at is None and not self._pending and self.expires is not None:
                # the renewal went unanswered: try again at 3/4 of the remaining time
                self._renew_at = now + max(1.0, (self.expires - now) / 2)
        if self._phase == _Phase.IDLE and self._reprobe_at is not None and now >= self._reprobe_at:
            self.start(now)

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None
