"""The path machine's vocabulary (meshd.paths): its timing and the decisions it hands out.

Shared by :class:`meshd.paths.PeerPath` and its upgrade attempts (meshd.attempts); the asyncio shells
(meshd.nat.core, meshd.nat.endpoints) carry the decisions out.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.proto.endpoint import Endpoint


@dataclass(frozen=True, slots=True)
class PathConfig:
    """Timing of the path machine, in seconds."""

    probe_interval: float = 0.5
    attempt_duration: float = 3.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    heartbeat_interval: float = 1.0
    dead_after: float = 3.0
    discovery_interval: float = 30.0
    late_after: float = 2.0
    handshake_stall: float = 185.0
    stall_penalty: float = 600.0
    switch_ratio: float = 0.7
    seq_rounds: int = 2
    seq_wait: float = 32.0  #: > Linux's nf_conntrack_udp_timeout (30 s) for unreplied flows
    seq_keepalive: float = 5.0
    seq_grace: float = 3.0


# --- decisions (drained with next_event) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UseRelay:
    """Point the peer's WireGuard endpoint at the local relay proxy."""

    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class UseDirect:
    """Point the peer's WireGuard endpoint at ``endpoint``."""

    peer: str
    endpoint: Endpoint
    rtt: float
    reason: str


@dataclass(frozen=True, slots=True)
class SendProbes:
    """Send one authenticated probe to each of ``endpoints`` now (from the WireGuard port).

    ``immediate``: the peer's NAT is open to us already (its probe arrived): no call-me-maybe first.
    ``first``: the first probes of a new attempt (the one moment a call-me-maybe is worth sending).
    """

    peer: str
    endpoints: tuple[Endpoint, ...]
    immediate: bool = False
    first: bool = False


@dataclass(frozen=True, slots=True)
class SendKeepalives:
    """Send a probe with a TTL of 1 to each of ``endpoints``: it refreshes our router's mapping towards the
    peer, or makes the router forget an expired one, and dies there, so it never reaches the peer's router
    (sequenced rounds, the meshd.paths docstring)."""

    peer: str
    endpoints: tuple[Endpoint, ...]


PathEvent = UseRelay | UseDirect | SendProbes | SendKeepalives
